"""The success metrics of the plan as SLOs, computed from the event log. Pure: no I/O.

Theory of operation
-------------------
``compute_slos(rows, now, window)`` takes the events of a window (``SloRow``: the few
fields of an event the objectives need) and returns one ``SloValue`` per objective and
scope — overall, per workflow name, per tenant, and per (tenant, workflow name). The
population of every objective is the workflows *submitted* in the window (their
``workflow.submitted`` event is in it); events of workflows submitted earlier are
ignored, so each figure is exact for its population whatever the window cuts off.

The objectives (``OBJECTIVES``), each with what counts:

* ``completion_24h`` ≥ 0.999 — of the decided workflows, the share that completed within
  24 h of submission. Decided: ended ``completed``, ``compensated`` or ``failed``, or
  still unfinished (running or parked) more than 24 h after submission. ``cancelled``
  is the user's choice and counts for nothing.
* ``mttr`` ≤ 30 s — mean time to recovery from a transient failure: from the first
  failed attempt of a step (``step.status`` → ``retrying``) to that step's success.
  A step that never succeeds did not recover and is not in the mean (it shows in
  ``completion_24h``).
* ``client_failure_share`` ≤ 0.05 — of the clients that submitted, the share that saw at
  least one of their workflows end ``compensated`` or ``failed``, or park.
* ``p95_completion`` ≤ 60 s — the 95th percentile of submit → completed (nearest rank).
* ``retry_efficiency`` ≤ 0.10 — of the steps that ran, the share that needed more than 3
  retries (a 5th attempt or later).
* ``overhead`` ≤ 0.20 — of the completed workflows' wall time (submitted → completed),
  the share not spent inside the step attempts that produced their results (the union
  of each succeeded attempt's ``running`` → ``succeeded`` interval): queueing, claims,
  checkpoints, failed attempts and backoff waits — everything the resilience layer adds
  around the work itself.

Error budget: ``burn`` is the budget spent — ``(1 - value) / (1 - objective)`` for an
"at least" objective, ``value / objective`` for an "at most" one — and ``budget_left =
1 - burn`` (negative once overspent). With no samples the value is None and the budget
untouched. ``burning`` decides the ``slo_burn`` alert: over a short window, the budget
is being spent faster than the long window allows (burn > 1) on enough samples.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL",
    "JSON_FIELDS",
    "OBJECTIVES",
    "Objective",
    "SloRow",
    "SloValue",
    "burning",
    "compute_slos",
    "format_window",
    "parse_window",
    "row_from_event",
    "scope_values",
    "untouched",
]

ALL = "*"
"""The tenant / workflow label of an aggregate over every tenant or workflow name."""

JSON_FIELDS = ("name", "objective", "value", "budget_left", "window")
"""The keys of one SLO in ``sync-server slo --json`` (SPEC, Observability); the HTTP
answer adds the scope (``tenant``, ``workflow``) and ``samples``."""

DAY = 86_400.0
_FAILED_ENDS = frozenset({"compensated", "failed"})
_ENDS = frozenset({"completed", "compensated", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Objective:
    """One SLO: its name, target, and whether the value must stay at least/at most it."""

    name: str
    objective: float
    at_least: bool
    unit: str
    description: str

    def burn(self, value: float) -> float:
        """The share of the error budget that ``value`` spends."""
        if self.at_least:
            return (1.0 - value) / (1.0 - self.objective)
        return value / self.objective


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("completion_24h", 0.999, True, "ratio", "workflows completed within 24 h"),
        Objective("mttr", 30.0, False, "seconds", "mean time to recover a failed step"),
        Objective("client_failure_share", 0.05, False, "ratio", "clients that saw a workflow fail"),
        Objective("p95_completion", 60.0, False, "seconds", "95th percentile submit → done"),
        Objective("retry_efficiency", 0.10, False, "ratio", "steps that needed > 3 retries"),
        Objective("overhead", 0.20, False, "ratio", "wall time outside the step work"),
    )
}


@dataclass(frozen=True, slots=True)
class SloRow:
    """The part of one event the SLOs read."""

    tenant: str
    workflow_id: str
    type: str
    at: float
    name: str = ""
    status: str = ""
    step: str = ""
    attempt: int = 0
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class SloValue:
    """One objective over one scope; ``as_json`` is the SPEC's JSON shape (plus scope)."""

    name: str
    objective: float
    value: float | None
    budget_left: float
    window: float
    tenant: str = ALL
    workflow: str = ALL
    samples: int = 0

    def as_json(self) -> dict[str, Any]:
        """The item of ``GET /v1/slo``: SPEC's keys (``JSON_FIELDS``), then the scope and
        the number of samples; ``window`` spelled as ``format_window`` does."""
        return {
            "name": self.name,
            "objective": self.objective,
            "value": None if self.value is None else round(self.value, 6),
            "budget_left": round(self.budget_left, 6),
            "window": format_window(self.window),
            "tenant": self.tenant,
            "workflow": self.workflow,
            "samples": self.samples,
        }


def row_from_event(tenant: str, workflow_id: str, type: str, data: Any, at: float) -> SloRow:
    """Pick the fields the SLOs need out of an event's data."""
    data = data if isinstance(data, dict) else {}
    snapshot = data.get("workflow")
    name = snapshot.get("name", "") if isinstance(snapshot, dict) else ""
    attempt = data.get("attempt")
    return SloRow(
        tenant=tenant,
        workflow_id=workflow_id,
        type=type,
        at=at,
        name=str(name),
        status=str(data.get("status") or ""),
        step=str(data.get("step") or ""),
        attempt=attempt if isinstance(attempt, int) else 0,
        client_id=str(data.get("client_id") or ""),
    )


@dataclass(slots=True)
class _Workflow:
    tenant: str
    name: str
    client: str
    submitted: float
    ended: str = ""
    ended_at: float = 0.0
    parked: bool = False
    # step -> attempt -> start of its latest running interval
    running: dict[tuple[str, int], float] = field(default_factory=dict)
    work: list[tuple[float, float]] = field(default_factory=list)
    first_failure: dict[str, float] = field(default_factory=dict)
    recoveries: list[float] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)


def _fold(rows: Iterable[SloRow]) -> dict[str, _Workflow]:
    """One pass over the rows (in log order): what each workflow went through."""
    flows: dict[str, _Workflow] = {}
    for row in rows:
        if row.type == "workflow.submitted":
            if row.workflow_id not in flows:
                flows[row.workflow_id] = _Workflow(row.tenant, row.name, row.client_id, row.at)
            continue
        flow = flows.get(row.workflow_id)
        if flow is None:
            continue  # submitted before the window: not in the population
        if row.type == "workflow.status":
            if row.status in _ENDS:
                flow.ended, flow.ended_at = row.status, row.at
            elif row.status == "parked":
                flow.parked = True
            elif row.status == "running":
                flow.parked = False
        elif row.type == "step.status" and row.step:
            key = (row.step, row.attempt)
            if row.attempt:
                flow.attempts[row.step] = max(flow.attempts.get(row.step, 0), row.attempt)
            if row.status == "running":
                flow.running[key] = row.at
            elif row.status == "retrying":
                flow.first_failure.setdefault(row.step, row.at)
                flow.running.pop(key, None)
            elif row.status == "succeeded":
                start = flow.running.pop(key, None)
                if start is not None:
                    flow.work.append((start, row.at))
                failed_at = flow.first_failure.pop(row.step, None)
                if failed_at is not None:
                    flow.recoveries.append(row.at - failed_at)
    return flows


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (parallel steps count once)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _measure(flows: list[_Workflow], now: float) -> dict[str, tuple[float | None, int]]:
    """Each objective's (value, samples) over one population."""
    decided = good = 0
    durations: list[float] = []
    recoveries: list[float] = []
    clients: set[str] = set()
    failing: set[str] = set()
    steps = heavy = 0
    wall = outside = 0.0
    for flow in flows:
        clients.add(flow.client)
        if flow.ended in _FAILED_ENDS or flow.parked:
            failing.add(flow.client)
        if flow.ended == "completed":
            decided += 1
            took = flow.ended_at - flow.submitted
            durations.append(took)
            if took <= DAY:
                good += 1
            if took > 0:
                wall += took
                outside += max(0.0, took - _busy(flow.work))
        elif flow.ended in _FAILED_ENDS or (not flow.ended and now - flow.submitted > DAY):
            decided += 1
        recoveries.extend(flow.recoveries)
        steps += len(flow.attempts)
        heavy += sum(1 for attempts in flow.attempts.values() if attempts > 4)
    return {
        "completion_24h": (good / decided if decided else None, decided),
        "mttr": (sum(recoveries) / len(recoveries) if recoveries else None, len(recoveries)),
        "client_failure_share": (len(failing) / len(clients) if clients else None, len(clients)),
        "p95_completion": (_p95(durations) if durations else None, len(durations)),
        "retry_efficiency": (heavy / steps if steps else None, steps),
        "overhead": (outside / wall if wall > 0 else None, len(durations)),
    }


def compute_slos(
    rows: Iterable[SloRow],
    now: float,
    window: float,
    objectives: dict[str, Objective] | None = None,
) -> list[SloValue]:
    """Every objective over every scope: overall, per workflow name, per tenant, and per
    (tenant, workflow name).

    Args:
        rows: the window's events in log order (earlier events are ignored through the
            population rule; rows of workflows submitted before ``now - window`` too).
        now: the end of the window.
        window: its length in seconds.
        objectives: the targets (default ``OBJECTIVES``).

    Returns:
        Values ordered by scope (overall first), then by the order of ``objectives``.
    """
    targets = objectives or OBJECTIVES
    since = now - window
    flows = [f for f in _fold(rows).values() if f.submitted >= since]
    scopes: dict[tuple[str, str], list[_Workflow]] = defaultdict(list)
    for flow in flows:
        scopes[(ALL, ALL)].append(flow)
        scopes[(ALL, flow.name)].append(flow)
        scopes[(flow.tenant, ALL)].append(flow)
        scopes[(flow.tenant, flow.name)].append(flow)
    scopes.setdefault((ALL, ALL), [])
    out: list[SloValue] = []
    for tenant, workflow in sorted(scopes, key=lambda s: (s != (ALL, ALL), s)):
        measured = _measure(scopes[(tenant, workflow)], now)
        for name, target in targets.items():
            value, samples = measured[name]
            left = 1.0 if value is None else 1.0 - target.burn(value)
            out.append(
                SloValue(name, target.objective, value, left, window, tenant, workflow, samples)
            )
    return out


def untouched(window: float, tenant: str = ALL, workflow: str = ALL) -> list[SloValue]:
    """Every objective of a scope with no samples in the window: budgets untouched."""
    return [
        SloValue(o.name, o.objective, None, 1.0, window, tenant, workflow)
        for o in OBJECTIVES.values()
    ]


def scope_values(
    values: list[SloValue], window: float, tenant: str = ALL, workflow: str = ALL
) -> list[SloValue]:
    """The values of one scope (``untouched`` ones if the window holds none of it)."""
    chosen = [v for v in values if v.tenant == tenant and v.workflow == workflow]
    return chosen or untouched(window, tenant, workflow)


def burning(value: SloValue, min_samples: int = 10) -> bool:
    """Whether ``value`` (over a short window) spends the budget faster than allowed."""
    return value.value is not None and value.samples >= min_samples and value.budget_left < 0


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_WINDOW = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_window(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``7d`` (or plain seconds) -> seconds.

    Raises:
        ValueError: not a positive duration of at most 90 days.
    """
    text = text.strip().lower()
    match = _WINDOW.fullmatch(text)
    try:
        seconds = float(match[1]) * _UNITS[match[2]] if match else float(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 7d)") from None
    if not 0 < seconds <= 90 * DAY or not math.isfinite(seconds):
        raise ValueError(f"window must be > 0 and at most 90d, not {text!r}")
    return seconds


def format_window(seconds: float) -> str:
    """The shortest exact spelling of a window: ``24h``, ``15m``, ``90s`` — in days only
    from two days on (``7d``), so the default window reads ``24h`` as SPEC spells it."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= (2 * size if unit == "d" else size) and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
