"""Look up by key, then attach, take the result, or submit: downstreams that are not
idempotent.

Theory of operation
-------------------
SPEC promise 3 hands every attempt of a step the same idempotency key, but a downstream
that does not honour keys (emp-job-queue overwrites and re-runs a job submitted twice)
would run the work once per attempt, and twice at once when two instances overlap. This
module makes such a downstream look idempotent from the step's side:

* the key names a sequence of *generations* of job ids (``job_id(key, n)``), the same on
  every instance and every attempt;
* before submitting, ``run_keyed`` looks the generations up in order: a generation that
  is *pending/running* is attached to, a *completed* one gives its result, a *failed*
  one is skipped, and the first generation the downstream never heard of (*absent*) is
  submitted — so a job is only ever resubmitted (under a fresh id) after it failed, and
  no job id is ever submitted twice by a sequential run of attempts;
* while attached, ``Downstream.wait`` returns the job's end: *completed* (done),
  *failed* (the attempt fails; the step's ``RetryPolicy`` decides), or *abandoned*
  (the adapter gave the job up itself — e.g. cancelled it because its worker died; the
  next generation is submitted in the same attempt, and that failure is not the
  attempt's).

The pure part is ``decide`` (what to do with the generations seen so far); ``run_keyed``
is the thin loop that asks the downstream. A downstream that is idempotent by key (the
example job service) uses one generation whose id is the key itself.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "MAX_GENERATIONS",
    "Action",
    "Downstream",
    "JobView",
    "KeyedOutcome",
    "decide",
    "generation_id",
    "run_keyed",
]

MAX_GENERATIONS = 32
"""Most job ids one key may use (each failed or abandoned job uses one)."""

STATUSES = ("absent", "pending", "running", "completed", "failed")


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the downstream describes it.

    Attributes:
        status: ``absent`` (never heard of), ``pending``, ``running``, ``completed`` or
            ``failed``.
        result: the job's result (completed), when known.
        error: why it failed, when known.
        started_at: when it started running (unix seconds), when known.
        abandoned: the adapter gave this job up itself (its failure is not the attempt's).
    """

    status: str
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    abandoned: bool = False

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown job status {self.status!r}")


class Action(enum.StrEnum):
    """What to do with a generation."""

    ATTACH = "attach"
    TAKE = "take"
    SUBMIT = "submit"
    NEXT = "next"


def decide(view: JobView) -> Action:
    """The rule for one generation: attach to a live job, take a finished one's result,
    submit where the downstream never heard of one, and look further after a failure."""
    if view.status in ("pending", "running"):
        return Action.ATTACH
    if view.status == "completed":
        return Action.TAKE
    if view.status == "absent":
        return Action.SUBMIT
    return Action.NEXT


def generation_id(key: str, generation: int) -> str:
    """A UUID-shaped job id for generation ``generation`` of ``key`` (stable everywhere)."""
    digest = hashlib.sha256(f"tether:{key}#{generation}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-a{digest[17:20]}-{digest[20:32]}"


class Downstream(Protocol):
    """What a non-idempotent downstream's adapter provides to ``run_keyed``."""

    async def lookup(self, job_id: str) -> JobView:
        """The job's current view (``absent`` if the downstream never heard of it)."""
        ...

    async def submit(self, job_id: str) -> None:
        """Submit the job under ``job_id``."""
        ...

    async def wait(self, job_id: str, view: JobView) -> JobView:
        """Wait for the job's end: a ``completed`` or ``failed`` view (``abandoned`` if
        the adapter gave it up and wants the next generation)."""
        ...


@dataclass(frozen=True, slots=True)
class KeyedOutcome:
    """How a keyed run ended: the job id of the last generation, and its final view."""

    job_id: str
    view: JobView
    submitted: bool


class TooManyGenerations(RuntimeError):
    """Every job id of a key was used (``MAX_GENERATIONS`` failed or abandoned jobs)."""


async def run_keyed(
    downstream: Downstream,
    key: str,
    *,
    naming: Callable[[str, int], str] = generation_id,
    generations: int = MAX_GENERATIONS,
) -> KeyedOutcome:
    """Run the job of ``key`` at most once per generation, whoever asks and how often.

    Args:
        downstream: the adapter's lookup / submit / wait.
        key: the step's idempotency key.
        naming: ``(key, generation) -> job id``.
        generations: most job ids the key may use.

    Returns:
        The outcome: a ``completed`` view (with its result) or a ``failed`` one.

    Raises:
        TooManyGenerations: every generation failed or was abandoned.
    """
    generation = 0
    submitted = False
    while generation < generations:
        job_id = naming(key, generation)
        view = await downstream.lookup(job_id)
        action = decide(view)
        if action is Action.NEXT:
            generation += 1
            continue
        if action is Action.TAKE:
            return KeyedOutcome(job_id, view, submitted)
        if action is Action.SUBMIT:
            await downstream.submit(job_id)
            submitted = True
        final = await downstream.wait(job_id, view)
        if final.status == "failed" and final.abandoned:
            generation += 1  # given up by us (a dead worker): not the attempt's failure
            continue
        return KeyedOutcome(job_id, final, submitted)
    raise TooManyGenerations(f"all {generations} job ids of {key!r} failed or were abandoned")
