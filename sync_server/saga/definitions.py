"""What a user declares: workflows, their steps, retry policies and the step context.

Theory of operation
-------------------
A ``Workflow`` is a named DAG of ``Step``s. It is validated once, when it is built, so a
broken definition fails at import time rather than in the middle of a run:

* step names are unique and non-empty;
* every ``depends_on`` names a step of the same workflow, and no step depends on itself;
* the dependency graph has no cycle (Kahn's algorithm; the error names the cycle).

The definition is plain data plus the user's coroutines. The saga machine reads only the
data (names, dependencies, attempt budgets, compensations, breaker names); the runner
calls the coroutines with a ``StepContext``. SPEC promise 3: every attempt of a step gets
the same ``idempotency_key`` (``"t<tenant tag>.{workflow_id}:{step}"``, the tag a hash
of the tenant since workflow ids are per tenant), compensations get
``"t<tenant tag>.{workflow_id}:{step}:compensate"``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from protocol import ErrorCode, TetherError, UsageError
from protocol.jsontypes import JSON
from protocol.limits import MAX_PROGRESS_MESSAGE

if TYPE_CHECKING:  # the context only carries the shell's client (tests/test_layering.py)
    import httpx

__all__ = [
    "STOP_CANCELLED",
    "STOP_INTERRUPTED",
    "STOP_SHUTDOWN",
    "DefinitionError",
    "JobRecorder",
    "Limit",
    "OnFailure",
    "PermanentError",
    "ProgressReporter",
    "RetryPolicy",
    "Step",
    "StepAction",
    "StepContext",
    "Workflow",
    "fingerprint",
    "load_workflows",
]


OnFailure = Literal["compensate", "park"]


class DefinitionError(UsageError, ValueError):
    """A workflow definition is invalid (duplicate step, unknown dependency, cycle...)."""


class PermanentError(TetherError):
    """Raised by a step to fail at once, without using the remaining attempts.

    Args:
        message: why the step cannot succeed; recorded as the step's error.
    """

    code = ErrorCode.INTERNAL

    @property
    def retryable(self) -> bool:
        """Never: that is the point of a permanent error."""
        return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how fast a failing step is tried again.

    Args:
        max_attempts: attempts in total, the first included (>= 1).
        base_delay: seconds before the second attempt (before jitter).
        max_delay: cap of any delay, seconds.
        multiplier: growth of the delay per attempt (>= 1).
        jitter: full jitter (a uniform draw in ``[0, delay]``), as LESSONS asks.

    Raises:
        DefinitionError: a value is out of range.
    """

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise DefinitionError("base_delay and max_delay must be >= 0")
        if self.multiplier < 1:
            raise DefinitionError(f"multiplier must be >= 1, not {self.multiplier}")


@dataclass(frozen=True, slots=True)
class Limit:
    """A named limit on a downstream, shared by every instance through the database.

    Args:
        concurrency: most attempts of steps naming this limit running at once, across
            all instances (None: no cap).
        per_second: most starts in any one-second window, across all instances (None:
            no cap).

    Raises:
        DefinitionError: a value is not a positive integer.
    """

    concurrency: int | None = None
    per_second: int | None = None

    def __post_init__(self) -> None:
        for label, value in (("concurrency", self.concurrency), ("per_second", self.per_second)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise DefinitionError(f"Limit {label} must be a positive integer, not {value!r}")


class ProgressReporter(Protocol):
    """Where ``StepContext.progress`` goes (the runner's coalescing publisher)."""

    def __call__(self, fraction: float, message: str | None) -> None: ...


def _ignore_progress(fraction: float, message: str | None) -> None:
    """The reporter of a context built outside a runner."""


class JobRecorder(Protocol):
    """Where ``StepContext.record_job`` goes (the runner's writer)."""

    def __call__(self, source: str, adapter: str) -> None: ...


def _ignore_job(source: str, adapter: str) -> None:
    """The job recorder of a context built outside a runner."""


STOP_CANCELLED = "cancelled"
"""``StepContext.stop_reason`` when the workflow was cancelled while the attempt ran."""
STOP_INTERRUPTED = "interrupted"
"""``StepContext.stop_reason`` when this instance lost the lease (another one resumes)."""
STOP_SHUTDOWN = "shutdown"
"""``StepContext.stop_reason`` when this instance is shutting down (another one resumes)."""


@dataclass(slots=True)
class StepContext:
    """Everything a step action (or compensation) is given.

    Attributes:
        workflow_id: the workflow's id.
        step: this step's name.
        input: the workflow's input.
        results: results of this step's dependencies (name -> result); a compensation
            also finds its own step's result under its own name.
        attempt: 1-based attempt number.
        idempotency_key: the same for every attempt of this step (SPEC promise 3).
        http: a shared ``httpx.AsyncClient``.
        log: a logger naming the workflow and step.
        tenant: the workflow's tenant.
        compensating: True when this call is the step's compensation.
        timeout: the step's timeout in seconds (None: none).
        stop_reason: set by the runner just before it cancels the attempt:
            ``"cancelled"`` (the workflow was cancelled: stop the downstream work too),
            ``"interrupted"`` (the lease was lost or taken over: another instance
            resumes the same attempt) or ``"shutdown"`` (this instance stops; another
            resumes). None while running, and when the step's own timeout expires.
    """

    workflow_id: str
    step: str
    input: JSON
    results: dict[str, JSON]
    attempt: int
    idempotency_key: str
    http: httpx.AsyncClient
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    tenant: str = ""
    compensating: bool = False
    reporter: ProgressReporter = field(default=_ignore_progress, repr=False)
    timeout: float | None = None
    stop_reason: str | None = None
    job_recorder: JobRecorder = field(default=_ignore_job, repr=False)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the step is (0..1). Live at once, durable at most every ~0.5 s.

        Args:
            fraction: done fraction, clamped to [0, 1] (NaN counts as 0).
            message: an optional short human text, cut to ``MAX_PROGRESS_MESSAGE``
                characters.
        """
        value = float(fraction)
        value = 0.0 if value != value else min(1.0, max(0.0, value))
        if message is not None:
            message = str(message)[:MAX_PROGRESS_MESSAGE]
        self.reporter(value, message)

    def record_job(self, source: str, adapter: str) -> None:
        """Note (durably, with the next checkpoint) that this attempt runs a job at a
        downstream, so the reconciliation sweep asks that source about this step.

        Args:
            source: the source name in the canonical rule (e.g. ``job-queue``).
            adapter: the adapter's name, to pick it among several of one source.
        """
        self.job_recorder(source, adapter)


StepAction = Callable[[StepContext], Awaitable[JSON]]
"""A step's action or compensation: a coroutine function taking the context."""


class Step:
    """One node of a workflow's DAG.

    Args:
        name: unique within the workflow.
        action: ``async def action(ctx) -> result`` (JSON-serialisable result).
        depends_on: names of the steps whose success this step waits for.
        compensate: ``async def undo(ctx)``, run if the workflow compensates after this
            step succeeded.
        timeout: seconds per attempt; an expired attempt counts as a failed one.
        retry: the retry policy (default ``RetryPolicy()``: 3 attempts).
        breaker: name of the downstream's circuit breaker (shared by every step using it).
        compensate_retry: retry policy of the compensation (default: ``retry``).
        limit: name of a ``Limit`` (configured on the server) every attempt of this step
            must fit in; a step waiting for its limit uses no attempt.

    Raises:
        DefinitionError: the name is empty, the timeout is not positive, or ``action`` is
            not callable.
    """

    __slots__ = (
        "action",
        "breaker",
        "compensate",
        "compensate_retry",
        "depends_on",
        "limit",
        "name",
        "retry",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        action: StepAction,
        *,
        depends_on: Sequence[str] = (),
        compensate: StepAction | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        breaker: str | None = None,
        compensate_retry: RetryPolicy | None = None,
        limit: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError("a step needs a non-empty name")
        if limit is not None and (not isinstance(limit, str) or not limit.strip()):
            raise DefinitionError(f"step {name!r}: limit must be a non-empty name")
        if ":" in name:
            raise DefinitionError(f"step name {name!r} must not contain ':'")
        if not callable(action):
            raise DefinitionError(f"step {name!r}: action must be an async callable")
        if compensate is not None and not callable(compensate):
            raise DefinitionError(f"step {name!r}: compensate must be an async callable")
        if timeout is not None and timeout <= 0:
            raise DefinitionError(f"step {name!r}: timeout must be > 0 seconds")
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        self.name = name
        self.action = action
        self.depends_on: tuple[str, ...] = tuple(depends_on)
        self.compensate = compensate
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.breaker = breaker
        self.compensate_retry = compensate_retry or self.retry
        self.limit = limit

    def __repr__(self) -> str:
        return f"Step({self.name!r}, depends_on={list(self.depends_on)!r})"


class Workflow:
    """A named DAG of steps.

    Args:
        name: the name clients submit (``submit_workflow(name, input)``).
        steps: the steps; order does not matter beyond ties in the run order.
        on_failure: after a step's last attempt, ``"compensate"`` undoes the completed
            steps in reverse dependency order; ``"park"`` keeps them and waits for
            ``retry_workflow`` or a DLQ requeue.
        version: the definition's version, stored with every workflow it starts; an
            instance runs only the versions it has (rolling deploys). None: a
            fingerprint of the steps (see ``fingerprint``).
        deadline: seconds from acceptance the whole workflow may take; when it passes,
            the running step is cancelled and ``on_failure`` applies.

    Raises:
        DefinitionError: no steps, a duplicate step name, an unknown dependency, a
            self-dependency, a cycle, an unknown ``on_failure``, an empty version or a
            deadline that is not a positive number.
    """

    def __init__(
        self,
        name: str,
        steps: Iterable[Step],
        *,
        on_failure: OnFailure = "compensate",
        version: str | None = None,
        deadline: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DefinitionError("a workflow needs a non-empty name")
        if version is not None and (
            not isinstance(version, str) or not version.strip() or len(version) > 64
        ):
            raise DefinitionError(f"workflow {name!r}: version must be 1..64 characters")
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not math.isfinite(deadline)
            or deadline <= 0
        ):
            raise DefinitionError(f"workflow {name!r}: deadline must be > 0 seconds")
        if on_failure not in ("compensate", "park"):
            raise DefinitionError(
                f"workflow {name!r}: on_failure must be 'compensate' or 'park', not {on_failure!r}"
            )
        step_list = list(steps)
        if not step_list:
            raise DefinitionError(f"workflow {name!r} has no steps")
        by_name: dict[str, Step] = {}
        for step in step_list:
            if not isinstance(step, Step):
                raise DefinitionError(f"workflow {name!r}: {step!r} is not a Step")
            if step.name in by_name:
                raise DefinitionError(f"workflow {name!r}: duplicate step name {step.name!r}")
            by_name[step.name] = step
        for step in step_list:
            for dep in step.depends_on:
                if dep == step.name:
                    raise DefinitionError(f"workflow {name!r}: step {dep!r} depends on itself")
                if dep not in by_name:
                    raise DefinitionError(
                        f"workflow {name!r}: step {step.name!r} depends on unknown step {dep!r}"
                    )
        self.name = name
        self.on_failure: OnFailure = on_failure
        self.steps: dict[str, Step] = by_name
        self.step_names: tuple[str, ...] = _topological_order(name, step_list)
        dependents: dict[str, list[str]] = {s: [] for s in self.step_names}
        for step in step_list:
            for dep in step.depends_on:
                dependents[dep].append(step.name)
        self.dependents: Mapping[str, tuple[str, ...]] = {
            s: tuple(d) for s, d in dependents.items()
        }
        self.leaves: tuple[str, ...] = tuple(s for s in self.step_names if not dependents[s])
        self.deadline: float | None = None if deadline is None else float(deadline)
        self.version: str = version if version is not None else fingerprint(self)

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={list(self.step_names)!r}, version={self.version!r})"


def fingerprint(workflow: Workflow) -> str:
    """The default version of a workflow: a hash of what its running instances rely on.

    It covers the steps' names (in run order), their dependencies, which steps have a
    compensation, which limit they use, and ``on_failure`` — the shape a stored
    workflow's state is tied to. Timeouts, retry policies and the code of the actions
    are left out: changing those does not make a new version (give ``version=`` for
    that). Stable across processes and Python versions (no ``hash()``).

    Returns:
        ``"fp-"`` and 12 hex digits of a SHA-256.
    """
    parts = [f"on_failure={workflow.on_failure}"]
    for name in workflow.step_names:
        step = workflow.steps[name]
        deps = ",".join(sorted(step.depends_on))
        comp = "1" if step.compensate is not None else "0"
        parts.append(f"{name}|{deps}|{comp}|{step.limit or ''}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return f"fp-{digest[:12]}"


def _topological_order(name: str, steps: list[Step]) -> tuple[str, ...]:
    """Kahn's algorithm, stable in declaration order; a cycle raises ``DefinitionError``."""
    remaining = {s.name: set(s.depends_on) for s in steps}
    order: list[str] = []
    while remaining:
        ready = [s.name for s in steps if s.name in remaining and not remaining[s.name]]
        if not ready:
            raise DefinitionError(
                f"workflow {name!r}: dependency cycle among {_describe_cycle(remaining)}"
            )
        for step_name in ready:
            order.append(step_name)
            del remaining[step_name]
        for deps in remaining.values():
            deps.difference_update(ready)
    return tuple(order)


def _describe_cycle(remaining: dict[str, set[str]]) -> str:
    """Walk dependencies from any blocked step until a name repeats: that is a cycle."""
    start = min(remaining)
    path = [start]
    while True:
        nxt = min(remaining[path[-1]])
        if nxt in path:
            cycle = [*path[path.index(nxt) :], nxt]
            return " -> ".join(cycle)
        path.append(nxt)


def load_workflows(spec: str) -> list[Workflow]:
    """Load definitions from ``"module:attr"`` (a Workflow or a list of them).

    Args:
        spec: e.g. ``"examples.image_pipeline:workflows"``.

    Returns:
        The workflows found.

    Raises:
        DefinitionError: the spec is malformed or names something that is not workflows.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DefinitionError(f"expected 'module:attr', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise DefinitionError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise DefinitionError(f"{module_name!r} has no attribute {attr!r}") from exc
    items = [target] if isinstance(target, Workflow) else list(target)
    if not items or not all(isinstance(w, Workflow) for w in items):
        raise DefinitionError(f"{spec!r} is not a Workflow or a list of Workflows")
    return items
