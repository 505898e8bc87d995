"""Circuit breakers per downstream name: a pure core over shared, stored state.

Theory of operation
-------------------
A breaker guards a downstream (``Step(breaker="render-service")``). Its state lives in
the store's ``breakers`` table (``BreakerRecord``), read and written inside the same
transaction as the step checkpoint, so every instance sees one breaker (LESSONS: no
engine shares breakers across instances; pybreaker has no asyncio — hence this module).

States and moves (``BreakerPolicy`` gives the numbers)::

    closed    --failures reach failure_threshold-->  open
    open      --reset_timeout elapsed, one step asks--> half_open (that step is the probe)
    half_open --probe succeeds-->  closed
    half_open --probe fails----->  open (the timer starts again)
    half_open --probe lost (probe_until passed)--> another step may probe

``allow`` answers "may this step start now?"; a refusal carries the time to ask again,
and the saga machine defers the step to then *without using an attempt* (SPEC). The
functions here are pure: they take ``now`` and return the new record and whether the
state changed; the runner writes changed records back and emits events, metrics and
alerts for the transitions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import NamedTuple

from sync_server.store.base import BreakerRecord

__all__ = ["BreakerPolicy", "BreakerState", "Decision", "allow", "record_failure", "record_success"]


class BreakerState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Numbers of one breaker.

    Args:
        failure_threshold: consecutive failures that open the breaker.
        reset_timeout: seconds open before one probe is let through.
        probe_timeout: seconds a probe may take before another step may probe instead.
        recheck: seconds a step waits while a probe is in flight.
    """

    failure_threshold: int = 5
    reset_timeout: float = 30.0
    probe_timeout: float = 60.0
    recheck: float = 0.5


class Decision(NamedTuple):
    """The answer of ``allow``."""

    allowed: bool
    retry_at: float | None
    record: BreakerRecord
    changed: bool


def allow(record: BreakerRecord, policy: BreakerPolicy, now: float, owner: str) -> Decision:
    """May a step guarded by this breaker start now?

    Args:
        record: the breaker's current shared state.
        policy: its numbers.
        now: the current time.
        owner: who would run the probe (instance and step), recorded on half-open.

    Returns:
        A ``Decision``: allowed, or refused with ``retry_at``; ``changed`` tells whether
        ``record`` (a new object) must be written back.
    """
    state = BreakerState(record.state)
    if state is BreakerState.CLOSED:
        return Decision(True, None, record, False)
    if state is BreakerState.OPEN:
        reopen_at = (record.opened_at or 0.0) + policy.reset_timeout
        if now < reopen_at:
            return Decision(False, reopen_at, record, False)
        probe = replace(
            record,
            state=BreakerState.HALF_OPEN.value,
            probe_owner=owner,
            probe_until=now + policy.probe_timeout,
            updated_at=now,
        )
        return Decision(True, None, probe, True)
    # half-open: one probe at a time; a probe that went silent is replaced.
    if record.probe_until is not None and record.probe_until < now:
        probe = replace(
            record, probe_owner=owner, probe_until=now + policy.probe_timeout, updated_at=now
        )
        return Decision(True, None, probe, True)
    retry_at = now + policy.recheck
    if record.probe_until is not None:
        retry_at = min(retry_at, record.probe_until)
    return Decision(False, retry_at, record, False)


def record_success(record: BreakerRecord, now: float) -> tuple[BreakerRecord, bool]:
    """A guarded step succeeded: the breaker closes and forgets its failures.

    Returns:
        (new record, whether the *state* changed).
    """
    if record.state == BreakerState.CLOSED and record.failures == 0:
        return record, False
    changed = record.state != BreakerState.CLOSED
    closed = replace(
        record,
        state=BreakerState.CLOSED.value,
        failures=0,
        opened_at=None,
        probe_owner=None,
        probe_until=None,
        updated_at=now,
    )
    return closed, changed


def record_failure(
    record: BreakerRecord, policy: BreakerPolicy, now: float
) -> tuple[BreakerRecord, bool]:
    """A guarded step failed (an error or a timeout).

    Returns:
        (new record, whether the breaker just opened).
    """
    failures = record.failures + 1
    state = BreakerState(record.state)
    opens = state is BreakerState.HALF_OPEN or (
        state is BreakerState.CLOSED and failures >= policy.failure_threshold
    )
    if opens:
        return (
            replace(
                record,
                state=BreakerState.OPEN.value,
                failures=failures,
                opened_at=now,
                probe_owner=None,
                probe_until=None,
                updated_at=now,
            ),
            True,
        )
    return replace(record, failures=failures, updated_at=now), False
