"""The typed, frozen state of one workflow's saga, and its JSON codec (one place).

Theory of operation
-------------------
A workflow row keeps the saga's state as JSON (the ``workflows.state`` column; the
store hands it over as plain data). ``decode_state`` turns that JSON into a
``WorkflowState`` — frozen msgspec Structs: one ``StepState`` per step with an explicit
``Compensation`` sub-state, typed ``Requests`` recorded by intake, the ``halt``,
``deadline_at``, ``cancel``, ``dlq`` and ``trace`` of the workflow — and
``encode_state`` turns it back. The ``SagaMachine`` owns the state: it replaces Structs
(``msgspec.structs.replace``), never mutates them.

The JSON shape is the wire contract of a rolling upgrade (two versions over one
PostgreSQL), so the codec writes exactly the keys the dict-based engine wrote::

    {"steps": {name: {"status", "attempts", "progress", "result", "error",
                      # present only when set:
                      "due_at", "retry_delay", "resume", "interrupts", "deferred",
                      "job", "slot",
                      # the compensation, present once it started:
                      "comp_attempts", "comp_running", "comp_due_at", "comp_resume",
                      "comp_failed"}},
     "halt": "compensate" | "park", "deadline_at": t, "cancel": true,
     "requests": {"cancel": true, "retry": true, "reconcile": [{"step", "result"}],
                  "resubmit": [step], "fail": [{"step", "error"}]},
     "dlq": [entry id], "trace": traceparent, "reports": {source: report}}

Keys this version does not know are kept (``extra``) and written back unchanged, so a
newer version's bookkeeping survives a checkpoint by this one. Clients see only
``steps[name].status/attempts/progress/result/error`` (``sync_server.snapshots``).
Readers that only peek at a row (the attempt scheduler, spans, the reconciliation
sweep) use the small accessors at the end instead of decoding the whole state.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import msgspec

from protocol import StepStatus
from protocol.jsontypes import JSON

__all__ = [
    "FRESH_STEP",
    "STATUS_TEXT",
    "CompPhase",
    "Compensation",
    "FailRepair",
    "Job",
    "ReconcileRepair",
    "Requests",
    "StepState",
    "WorkflowState",
    "attempt_alive",
    "cancel_applied",
    "deadline_of",
    "decode_state",
    "encode_requests",
    "encode_state",
    "pending_repairs",
    "requested",
    "step_wire",
    "steps_wire",
    "store_requests",
    "trace_of",
]

_STEP_STATUSES = {status.value: status for status in StepStatus}
STATUS_TEXT = {status: status.value for status in StepStatus}
"""A step status as plain text (``.value`` is a descriptor call; this is a dict lookup)."""


class CompPhase(StrEnum):
    """Where a step's compensation is (the outcome is explicit, not a flag beside a
    ``failed`` status)."""

    IDLE = "idle"  # started before; not running now (done, or waiting for its retry)
    RUNNING = "running"  # an attempt runs
    EXHAUSTED = "exhausted"  # its last attempt failed: the workflow failed


# Enum members as constants: ``StepStatus.RUNNING`` is a descriptor call on every use.
_C_IDLE, _C_RUNNING, _C_EXHAUSTED = CompPhase.IDLE, CompPhase.RUNNING, CompPhase.EXHAUSTED


class Compensation(msgspec.Struct, frozen=True):
    """The compensation of one step, once it started (wire: the ``comp_*`` keys)."""

    attempts: int = 0
    phase: CompPhase = _C_IDLE
    due_at: float | None = None
    resume: bool = False  # re-run the same attempt (its holder vanished)

    @property
    def running(self) -> bool:
        return self.phase is _C_RUNNING

    @property
    def exhausted(self) -> bool:
        return self.phase is _C_EXHAUSTED


class Job(msgspec.Struct, frozen=True):
    """The downstream job the running attempt runs (asked by the reconciliation sweep)."""

    source: str
    adapter: str


class StepState(msgspec.Struct, frozen=True):
    """One step: what clients see (status … error) and the engine's bookkeeping."""

    status: StepStatus
    attempts: int = 0
    progress: float = 0.0
    result: JSON = None
    error: str | None = None
    due_at: float | None = None
    retry_delay: float | None = None
    resume: bool = False  # the next start re-runs the same attempt
    interrupts: int = 0
    deferred: str | None = None  # a breaker name, or "limit:<name>"
    job: Job | None = None
    slot: str | None = None  # the limit whose slot the running attempt holds
    comp: Compensation | None = None
    extra: dict[str, JSON] | None = None


class ReconcileRepair(msgspec.Struct, frozen=True):
    """The job source says the step's job completed with ``result``."""

    step: str
    result: JSON


class FailRepair(msgspec.Struct, frozen=True):
    """The job source says the step's running job failed with ``error``."""

    step: str
    error: str


class Requests(msgspec.Struct, frozen=True, omit_defaults=True):
    """What intake recorded for the next claim to apply through the machine."""

    cancel: bool = False
    retry: bool = False
    reconcile: tuple[ReconcileRepair, ...] = ()
    resubmit: tuple[str, ...] = ()
    fail: tuple[FailRepair, ...] = ()


class WorkflowState(msgspec.Struct, frozen=True):
    """The saga state of one workflow (``steps`` in definition order).

    ``steps`` is a dict the owner (a ``SagaMachine``) replaces items of; the Structs in
    it are never changed in place.
    """

    steps: dict[str, StepState]
    halt: str | None = None  # "compensate" | "park": a step used its last attempt
    deadline_at: float | None = None
    cancel: bool = False
    requests: Requests | None = None
    dlq: tuple[int, ...] = ()
    trace: str = ""
    reports: dict[str, JSON] | None = None  # the reconciliation's, by source
    extra: dict[str, JSON] | None = None


# ------------------------------------------------------------------ codec

_STEP_KEYS = frozenset(
    (
        "status",
        "attempts",
        "progress",
        "result",
        "error",
        "due_at",
        "retry_delay",
        "resume",
        "interrupts",
        "deferred",
        "job",
        "slot",
        "comp_attempts",
        "comp_running",
        "comp_due_at",
        "comp_resume",
        "comp_failed",
    )
)
_CLIENT_KEYS = frozenset(("status", "attempts", "progress", "result", "error"))
_STATE_KEYS = frozenset(
    ("steps", "halt", "deadline_at", "cancel", "requests", "dlq", "trace", "reports")
)


def _decode_step(d: Mapping[str, JSON]) -> StepState:
    # The hot path of every checkpoint: plain lookups, no conversions (the JSON was
    # written by this codec or by the dict-based engine, with the same types).
    if d.keys() == _CLIENT_KEYS:  # the common case: a step with no bookkeeping
        status = d["status"]
        return StepState(
            _STEP_STATUSES.get(status) or StepStatus(status),
            d["attempts"],
            d["progress"],
            d["result"],
            d["error"],
        )
    get = d.get
    status = get("status", "waiting")
    comp = None
    if "comp_attempts" in d or "comp_running" in d:
        running, failed = get("comp_running"), get("comp_failed")
        phase = _C_RUNNING if running else _C_EXHAUSTED if failed else _C_IDLE
        comp = Compensation(
            get("comp_attempts") or 0, phase, get("comp_due_at"), get("comp_resume", False)
        )
    job = get("job")
    return StepState(
        _STEP_STATUSES.get(status) or StepStatus(status),
        get("attempts", 0),
        get("progress", 0.0),
        get("result"),
        get("error"),
        get("due_at"),
        get("retry_delay"),
        get("resume", False),
        get("interrupts", 0),
        get("deferred"),
        None if job is None else Job(str(job.get("source", "")), str(job.get("adapter", ""))),
        get("slot"),
        comp,
        None if _STEP_KEYS.issuperset(d) else {k: v for k, v in d.items() if k not in _STEP_KEYS},
    )


FRESH_STEP = StepState(StepStatus.WAITING)
"""A step that has not run yet (frozen: every new workflow shares it)."""


def _encode_step(s: StepState) -> dict[str, JSON]:
    if s is FRESH_STEP:
        return {"status": "waiting", "attempts": 0, "progress": 0.0, "result": None, "error": None}
    d: dict[str, JSON] = {
        "status": STATUS_TEXT[s.status],
        "attempts": s.attempts,
        "progress": s.progress,
        "result": s.result,
        "error": s.error,
    }
    if s.due_at is not None:
        d["due_at"] = s.due_at
    if s.retry_delay is not None:
        d["retry_delay"] = s.retry_delay
    if s.resume:
        d["resume"] = True
    if s.interrupts:
        d["interrupts"] = s.interrupts
    if s.deferred is not None:
        d["deferred"] = s.deferred
    if s.job is not None:
        d["job"] = {"source": s.job.source, "adapter": s.job.adapter}
    if s.slot is not None:
        d["slot"] = s.slot
    comp = s.comp
    if comp is not None:
        d["comp_attempts"] = comp.attempts
        d["comp_running"] = comp.phase is _C_RUNNING
        if comp.due_at is not None:
            d["comp_due_at"] = comp.due_at
        if comp.resume:
            d["comp_resume"] = True
        if comp.phase is _C_EXHAUSTED:
            d["comp_failed"] = True
    if s.extra:
        d.update(s.extra)
    return d


def encode_requests(requests: Requests) -> dict[str, JSON]:
    """The JSON of ``requests`` (only what was requested; lists, as JSON reads back)."""
    d: dict[str, JSON] = {}
    if requests.cancel:
        d["cancel"] = True
    if requests.retry:
        d["retry"] = True
    if requests.reconcile:
        d["reconcile"] = [{"step": r.step, "result": r.result} for r in requests.reconcile]
    if requests.resubmit:
        d["resubmit"] = list(requests.resubmit)
    if requests.fail:
        d["fail"] = [{"step": r.step, "error": r.error} for r in requests.fail]
    return d


_REQUEST_KEYS = frozenset(Requests.__struct_fields__)


def store_requests(data: dict[str, JSON], requests: Requests) -> None:
    """Write ``requests`` into a row's JSON state (intake), keeping the request keys this
    version does not know (a newer version's, for its next claim) as they were."""
    raw = data.get("requests")
    kept = {k: v for k, v in raw.items() if k not in _REQUEST_KEYS} if isinstance(raw, dict) else {}
    data["requests"] = {**kept, **encode_requests(requests)}


def _decode_requests(d: JSON) -> Requests:
    return msgspec.convert(d, Requests)


def decode_state(data: JSON) -> WorkflowState:
    """The typed state of a row's ``state`` JSON (anything but a dict: empty state)."""
    if not data or not isinstance(data, dict):
        return WorkflowState({})
    get = data.get
    steps = get("steps") or {}
    if len(data) == 1 and "steps" in data:  # the common case of a running workflow
        return WorkflowState({name: _decode_step(s) for name, s in steps.items()})
    requests = get("requests")
    dlq = get("dlq")
    return WorkflowState(
        {name: _decode_step(s) for name, s in steps.items()},
        get("halt"),
        get("deadline_at"),
        get("cancel", False),
        None if requests is None else _decode_requests(requests),
        tuple(dlq) if dlq else (),
        get("trace") or "",
        get("reports"),
        None
        if _STATE_KEYS.issuperset(data)
        else {k: v for k, v in data.items() if k not in _STATE_KEYS},
    )


def encode_state(
    state: WorkflowState,
    decoded: Mapping[str, StepState] | None = None,
    source: Mapping[str, JSON] | None = None,
) -> dict[str, JSON]:
    """The JSON of ``state``, in exactly the shape every version reads and writes.

    Args:
        state: the state to encode.
        decoded, source: the steps as decoded from ``source`` (the JSON steps): a step
            that is still that very Struct is written as its source JSON (not copied:
            nobody changes a step's JSON in place), so a checkpoint encodes only the
            steps it changed.
    """
    if decoded and source:
        steps: dict[str, JSON] = {}
        for name, s in state.steps.items():
            steps[name] = source[name] if decoded.get(name) is s else _encode_step(s)
    else:
        steps = {name: _encode_step(s) for name, s in state.steps.items()}
    d: dict[str, JSON] = {"steps": steps}
    if state.halt is not None:
        d["halt"] = state.halt
    if state.deadline_at is not None:
        d["deadline_at"] = state.deadline_at
    if state.cancel:
        d["cancel"] = True
    if state.requests is not None:
        d["requests"] = encode_requests(state.requests)
    if state.dlq:
        d["dlq"] = list(state.dlq)
    if state.trace:
        d["trace"] = state.trace
    if state.reports is not None:
        d["reports"] = state.reports
    if state.extra:
        d.update(state.extra)
    return d


# ------------------------------------------------------------------ peeks at the JSON


def steps_wire(data: JSON) -> dict[str, dict[str, JSON]]:
    """``state["steps"]`` of a row's JSON state ({} when there is none)."""
    if not isinstance(data, dict):
        return {}
    steps: dict[str, dict[str, JSON]] = data.get("steps") or {}
    return steps


def step_wire(data: JSON, step: str) -> dict[str, JSON]:
    """One step's JSON ({} when unknown): ``status``, ``attempts``, ... (see above)."""
    return steps_wire(data).get(step) or {}


def requested(data: JSON) -> Requests:
    """The requests recorded in a row's JSON state and not yet applied."""
    raw = data.get("requests") if isinstance(data, dict) else None
    return Requests() if raw is None else _decode_requests(raw)


def pending_repairs(data: JSON) -> list[str]:
    """The steps a recorded reconciliation repair (complete, resubmit, fail) names."""
    requests = requested(data)
    return (
        [r.step for r in requests.reconcile]
        + list(requests.resubmit)
        + [r.step for r in requests.fail]
    )


def trace_of(data: JSON) -> str:
    """The workflow's traceparent ("" when not traced)."""
    trace = data.get("trace") if isinstance(data, dict) else None
    return trace or ""


def deadline_of(data: JSON) -> float | None:
    """The workflow's deadline (unix time), if it has one."""
    return data.get("deadline_at") if isinstance(data, dict) else None


def cancel_applied(data: JSON) -> bool:
    """A cancel has been applied (the workflow stops and compensates)."""
    return isinstance(data, dict) and bool(data.get("cancel"))


def attempt_alive(step: Mapping[str, JSON], compensation: bool) -> bool:
    """The step's JSON says its attempt (or its compensation's) is running."""
    if compensation:
        return bool(step.get("comp_running"))
    return step.get("status") == "running"
