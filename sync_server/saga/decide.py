"""The pure part of a checkpoint: what the machine decides for one workflow.

Theory of operation
-------------------
A checkpoint is *read → decide → write* (``checkpoint.py`` is the shell that reads and
writes). This module is the middle: no awaits, no I/O, no clock — everything comes in
as arguments (the prefetched row, its inputs, the breaker records read beforehand,
``now``) and comes out as values:

1. ``prepare`` builds a ``SagaMachine`` on the row's state (decoded into the machine's
   own typed state, ``sagastate``) and feeds it the claim, the inputs in order and the
   deadline. The result (``Draft``) names the breakers
   it needs (``Draft.breakers_needed``): those of guarded outcomes and those guarding the
   steps about to start. The shell reads them (locked, in name order).
2. ``Draft.gate_breakers`` records the guarded outcomes on those records and defers each
   ready step an open breaker blocks (``SagaMachine.receive_breaker_open``). It returns
   a ``BreakerGate``: the changed records to write and the state transitions to report
   (``BreakerChange``). Nothing is reported from inside the transaction: the shell hands
   the transitions back with the commit's result and the runner reports them only after
   ``Store.run`` returned — a transaction retried after a deadlock reports each change
   once, and a commit that failed reports nothing.
3. ``Draft.steps_to_admit`` lists the ready steps that name a limit; the shell admits
   them (a limit slot is taken under the limit row's lock, so that read is also its
   write) and ``Draft.finish`` applies the admissions, advances the machine and drains
   its effects (events, commands, dead letters, alerts, dead letters to close).

``settle_limits`` (pure too) says which limit slots and waiters a decision frees. A draft
that raises anywhere is dropped whole: the shell writes nothing for that workflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from sync_server.saga import breaker as breakers
from sync_server.saga.backoff import DelayPolicy
from sync_server.saga.definitions import Limit, Workflow
from sync_server.saga.inputs import MachineInput, StepFailed, StepSucceeded, apply_input
from sync_server.saga.limits import Admission
from sync_server.saga.machine import Effect, SagaMachine
from sync_server.store.base import BreakerRecord, WorkflowKey, WorkflowRecord

__all__ = [
    "BreakerChange",
    "BreakerGate",
    "Draft",
    "Input",
    "prepare",
    "settle_limits",
]


@dataclass(frozen=True, slots=True)
class Input:
    """One thing that happened to a workflow, waiting for its checkpoint: the typed,
    frozen machine input (``inputs.MachineInput``), the workflow it is for (ids are per
    tenant), the fence of the lease it was produced under, and the circuit breaker an
    attempt's outcome counts for."""

    event: MachineInput
    workflow_id: str
    fence: int
    tenant: str = field(kw_only=True)
    breaker: str | None = field(default=None, kw_only=True)

    @property
    def key(self) -> WorkflowKey:
        """The workflow's ``(tenant, id)``."""
        return WorkflowKey(self.tenant, self.workflow_id)


class BreakerChange(NamedTuple):
    """A breaker moved to ``state`` (reported after COMMIT: log, metric, alert)."""

    name: str
    state: str


@dataclass(slots=True)
class BreakerGate:
    """What the breakers decided for one workflow."""

    records: dict[str, BreakerRecord] = field(default_factory=dict)
    """Changed records by name, to write (only if the whole decision succeeds)."""
    changes: list[BreakerChange] = field(default_factory=list)
    """State transitions, in the order they happened."""
    seen: dict[str, str] = field(default_factory=dict)
    """Breaker name -> its state as the gate read it (a span attribute)."""


@dataclass(slots=True)
class Draft:
    """A machine fed with a workflow's inputs, before the breakers and limits decide."""

    machine: SagaMachine
    definition: Workflow
    outcomes: list[tuple[str, bool]]
    """(breaker, succeeded) of each guarded outcome, in order."""
    guarded: bool
    """Some step of the definition names a breaker."""
    limited: bool
    """Some step of the definition names a limit."""

    def breakers_needed(self, now: float) -> set[str]:
        """The breakers ``gate_breakers`` reads: of guarded outcomes and ready steps."""
        needed = {name for name, _ in self.outcomes}
        if not self.guarded:
            return needed
        for step in self.machine.ready_steps(now):
            guard = self.definition.steps[step].breaker
            if guard is not None:
                needed.add(guard)
        return needed

    def gate_breakers(
        self,
        current: Mapping[str, BreakerRecord],
        policy: Callable[[str], breakers.BreakerPolicy],
        owner: str,
        now: float,
    ) -> BreakerGate:
        """Record guarded outcomes on their breakers, then defer the ready steps an open
        breaker blocks (no attempt used).

        Args:
            current: every breaker of ``breakers_needed`` (a missing one is closed).
            policy: the ``BreakerPolicy`` of a breaker name.
            owner: this instance's lease owner id (a half-open probe records it).
            now: the current time.
        """
        gate = BreakerGate()
        if not self.outcomes and not self.guarded:
            return gate  # the common case: nothing to read or decide

        def get(name: str) -> BreakerRecord:
            return gate.records.get(name) or current.get(name) or BreakerRecord(name=name)

        for name, ok in self.outcomes:
            record = get(name)
            if ok:
                new, moved = breakers.record_success(record, now)
            else:
                new, moved = breakers.record_failure(record, policy(name), now)
            if new is not record:
                gate.records[name] = new
            if moved:
                gate.changes.append(BreakerChange(name, new.state))
        machine = self.machine
        for step in machine.ready_steps(now) if self.guarded else ():
            guard = self.definition.steps[step].breaker
            if guard is None:
                continue
            decision = breakers.allow(
                get(guard),
                policy(guard),
                now,
                f"{owner}/{machine.tenant}/{machine.workflow_id}",
            )
            gate.seen[guard] = decision.record.state
            if decision.changed:
                gate.records[guard] = decision.record
                gate.changes.append(BreakerChange(guard, decision.record.state))
            if not decision.allowed:
                assert decision.retry_at is not None
                machine.receive_breaker_open(step, decision.retry_at, guard, now)
        return gate

    def steps_to_admit(self, limits: Mapping[str, Limit], now: float) -> list[tuple[str, str]]:
        """(step, limit) of each ready step that names a configured limit."""
        out: list[tuple[str, str]] = []
        if not self.limited:
            return out
        for step in self.machine.ready_steps(now):
            name = self.definition.steps[step].limit
            if name is not None and name in limits:
                out.append((step, name))
        return out

    def finish(self, admissions: Mapping[str, tuple[str, Admission]], now: float) -> list[Effect]:
        """Apply the limits' answers (step -> (limit, admission)): an admitted step holds a
        slot (``StepState.slot``), the others wait without using an attempt; then advance
        the machine and return its effects."""
        machine = self.machine
        for step, (name, admission) in admissions.items():
            if admission.admitted:
                machine.receive_limit_admitted(step, name)
            else:
                machine.receive_limit_wait(step, admission.retry_at, name, now)
        machine.advance(now)
        return machine.effects_to_apply()


def prepare(
    definition: Workflow,
    record: WorkflowRecord,
    inputs: list[Input],
    now: float,
    delay: DelayPolicy,
    *,
    claimed: bool = False,
) -> Draft:
    """Build the machine of ``record`` (on its own typed copy of the state) and feed it
    the claim, ``inputs`` in order and the deadline.

    Raises:
        Exception: whatever the machine raises on a bad state (the caller skips the
            workflow).
    """
    machine = SagaMachine(
        definition,
        record.id,
        record.status,
        record.state,  # decoded by the machine (``sagastate``); the row is not changed
        progress=record.progress,
        result=record.result,
        error=record.error,
        delay=delay,
        tenant=record.tenant,
    )
    if claimed:
        machine.receive_claim(now)
    outcomes = _feed(machine, inputs, now)
    machine.receive_deadline(now)
    steps = definition.steps.values()
    return Draft(
        machine,
        definition,
        outcomes,
        guarded=any(step.breaker for step in steps),
        limited=any(step.limit for step in steps),
    )


def _feed(machine: SagaMachine, inputs: list[Input], now: float) -> list[tuple[str, bool]]:
    """Feed inputs in order; returns (breaker, succeeded) for guarded outcomes."""
    outcomes: list[tuple[str, bool]] = []
    for item in inputs:
        event = item.event
        accepted = apply_input(machine, event, now)
        # A permanent error is the step's verdict, not the downstream's health.
        if accepted and item.breaker:
            if isinstance(event, StepSucceeded):
                outcomes.append((item.breaker, True))
            elif isinstance(event, StepFailed) and not event.permanent:
                outcomes.append((item.breaker, False))
    return outcomes


def settle_limits(machine: SagaMachine) -> tuple[list[str], list[str]]:
    """Forget the slots of steps that stopped running and the waits of steps that no
    longer wait (``SagaMachine.settle_limits``).

    Returns:
        (steps whose slot to free, steps whose waiter rows to drop).
    """
    return machine.settle_limits()
