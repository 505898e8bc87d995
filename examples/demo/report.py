"""The demo's closing report, computed from what the server, the job service and the
clients' own files hold — never from the demo's counters.

Sources (``Evidence``):

* **clients** — each client's SQLite file: every workflow whose ``submit_workflow``
  returned is there (a queued ``submit_workflow`` mutation, or the workflow row written
  when the server confirmed it), with the status of the client's confirmed view;
* **server** — ``GET /v1/workflows`` (statuses, steps), ``GET /v1/pull`` (the event log:
  submissions with their inputs, retries, breaker deferrals, dead letters) and
  ``GET /v1/dlq?status=all``;
* **job service** — ``GET /stats``: applied effects per idempotency key and the
  per-kind ledger of the small effects (reserve, refund, store, charge, cancel).

The verdict (``DemoReport.ok``): nothing lost (every submitted id is on the server),
nothing duplicated (no render key applied twice, no request that became two workflows,
no workflow with two keys for one kind of effect), every workflow ended or parked
(SPEC promise 2), and every client's view equals the server's (promise 5).
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync_server.slo import ALL, OBJECTIVES, SloValue, compute_slos, row_from_event

__all__ = ["FINAL", "ClientFile", "DemoReport", "Evidence", "build_report", "read_client_file"]

FINAL = frozenset({"completed", "compensated", "failed", "cancelled", "parked"})


@dataclass(slots=True)
class ClientFile:
    """What one client's SQLite file says it submitted, and its confirmed views."""

    submitted: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    views: dict[str, str | None] = field(default_factory=dict)
    pending: int = 0


def read_client_file(path: Path) -> ClientFile:
    """Read a client's SQLite file (the SDK's schema) read-only.

    Args:
        path: the file.

    Returns:
        Its submissions (queued or confirmed), rejections, view statuses, pending count.
    """
    out = ClientFile()
    if not path.exists():
        return out
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for workflow_id, status in conn.execute(
            "SELECT workflow_id, status FROM mutations WHERE name = 'submit_workflow'"
        ):
            out.submitted.add(workflow_id)
            if status == "pending":
                out.pending += 1
        for workflow_id, status, rejected in conn.execute(
            "SELECT id, status, rejected FROM workflows"
        ):
            if rejected == "submit_workflow":
                out.rejected.add(workflow_id)
            else:
                out.submitted.add(workflow_id)
                out.views[workflow_id] = status
        out.submitted -= out.rejected
    finally:
        conn.close()
    return out


@dataclass(slots=True)
class Evidence:
    """Everything the report is computed from."""

    clients: list[ClientFile]
    workflows: list[dict[str, Any]]
    events: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    job_stats: dict[str, Any]
    seconds: float
    faults: list[str] = field(default_factory=list)


@dataclass(slots=True)
class DemoReport:
    """The numbers of one demo run."""

    submitted: int
    on_server: int
    completed: int
    compensated: int
    parked: int
    failed: int
    cancelled: int
    unfinished: int
    lost: int
    duplicated: int
    rejected: int
    retries: int
    dead_letters: int
    requeued: int
    breaker_deferrals: int
    job_failures: int
    job_stalls: int
    redeliveries: int
    diverged: int
    seconds: float
    faults: list[str] = field(default_factory=list)
    slos: list[SloValue] = field(default_factory=list)
    """The SLOs over the run (``sync_server.slo``, from the server's log)."""

    @property
    def ok(self) -> bool:
        """Nothing lost or duplicated, every workflow ended or parked, clients converged."""
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.unfinished == 0
            and (self.diverged == 0)
        )

    def rows(self) -> list[tuple[str, str, str]]:
        """(measure, value, where it was read) for the report table."""
        return [
            ("submitted", str(self.submitted), "clients' SQLite files (returned submits)"),
            ("on the server", str(self.on_server), "server: GET /v1/workflows"),
            ("completed", str(self.completed), "server"),
            ("compensated", str(self.compensated), "server"),
            ("parked", str(self.parked), "server (awaiting a human in the DLQ)"),
            ("failed", str(self.failed), "server"),
            ("cancelled", str(self.cancelled), "server"),
            ("unfinished", str(self.unfinished), "server (must be 0: every workflow ends)"),
            ("lost", str(self.lost), "submitted minus on the server (must be 0)"),
            ("duplicated effects", str(self.duplicated), "job service books + log (must be 0)"),
            ("rejected submits", str(self.rejected), "clients' SQLite files"),
            ("retries", str(self.retries), "server log: step.status retrying"),
            ("dead letters", str(self.dead_letters), "server: GET /v1/dlq?status=all"),
            ("requeued from the DLQ", str(self.requeued), "server log: dlq.requeued"),
            ("breaker deferrals", str(self.breaker_deferrals), "server log: breaker.changed"),
            ("job failures / stalls", f"{self.job_failures} / {self.job_stalls}", "job service"),
            ("redeliveries absorbed", str(self.redeliveries), "job service (same key again)"),
            ("client views diverged", str(self.diverged), "clients' files vs server"),
            ("time", f"{self.seconds:.1f} s", "wall clock"),
            *(_slo_row(value) for value in self.slos),
        ]

    def line(self) -> str:
        """One machine-readable line: ``REPORT key=value …``."""
        fields = {
            "submitted": self.submitted,
            "on_server": self.on_server,
            "completed": self.completed,
            "compensated": self.compensated,
            "parked": self.parked,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "unfinished": self.unfinished,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "rejected": self.rejected,
            "retries": self.retries,
            "dead_letters": self.dead_letters,
            "requeued": self.requeued,
            "breaker_deferrals": self.breaker_deferrals,
            "job_failures": self.job_failures,
            "job_stalls": self.job_stalls,
            "diverged": self.diverged,
            "seconds": f"{self.seconds:.1f}",
            "ok": int(self.ok),
        }
        return "REPORT " + " ".join(f"{key}={value}" for key, value in fields.items())


def build_report(evidence: Evidence) -> DemoReport:
    """Compute the report (pure).

    Args:
        evidence: what was read from the clients, the server and the job service.

    Returns:
        The ``DemoReport``.
    """
    submitted: set[str] = set()
    rejected: set[str] = set()
    for client in evidence.clients:
        submitted |= client.submitted
        rejected |= client.rejected
    server = {w["id"]: w for w in evidence.workflows}
    statuses = Counter(w["status"] for w in evidence.workflows)

    requests: Counter[str] = Counter()
    retries = deferrals = requeued = 0
    for event in evidence.events:
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "workflow.submitted":
            request = (data.get("input") or {}).get("request")
            if request is not None:
                requests[str(request)] += 1
        elif kind == "step.status" and data.get("status") == "retrying":
            retries += 1
        elif kind == "breaker.changed":
            deferrals += 1
        elif kind == "dlq.requeued":
            requeued += 1

    stats = evidence.job_stats
    effects: dict[str, int] = stats.get("effects", {})
    duplicated = sum(n - 1 for n in effects.values() if n > 1)
    duplicated += sum(n - 1 for n in requests.values() if n > 1)
    keys_per_kind: dict[tuple[str, str], set[str]] = defaultdict(set)
    redeliveries = sum(stats.get("duplicates", {}).values())
    for kind, keys in (stats.get("ledger") or {}).items():
        for key, times in keys.items():
            keys_per_kind[(kind, key.split(":", 1)[0])].add(key)
            redeliveries += max(0, times - 1)
    duplicated += sum(len(keys) - 1 for keys in keys_per_kind.values() if len(keys) > 1)

    diverged = 0
    for client in evidence.clients:
        for workflow_id, status in client.views.items():
            remote = server.get(workflow_id)
            if remote is not None and status != remote["status"]:
                diverged += 1

    return DemoReport(
        submitted=len(submitted),
        on_server=len(server),
        completed=statuses["completed"],
        compensated=statuses["compensated"],
        parked=statuses["parked"],
        failed=statuses["failed"],
        cancelled=statuses["cancelled"],
        unfinished=sum(n for status, n in statuses.items() if status not in FINAL),
        lost=len(submitted - server.keys()),
        duplicated=duplicated,
        rejected=len(rejected),
        retries=retries,
        dead_letters=len(evidence.dead_letters),
        requeued=requeued,
        breaker_deferrals=deferrals,
        job_failures=sum(stats.get("failures", {}).values()),
        job_stalls=sum(stats.get("stalls", {}).values()),
        redeliveries=redeliveries,
        diverged=diverged,
        seconds=evidence.seconds,
        faults=list(evidence.faults),
        slos=_run_slos(evidence.events),
    )


def _run_slos(events: list[dict[str, Any]]) -> list[SloValue]:
    """The overall SLOs over the run: its first event to its last."""
    rows = [
        row_from_event("demo", str(e.get("workflow_id")), str(e.get("type")), e.get("data"), at)
        for e in events
        if isinstance(at := e.get("at"), int | float)
    ]
    if not rows:
        return []
    now = max(row.at for row in rows) + 1.0
    window = float(math.ceil(now - min(row.at for row in rows)))
    return [v for v in compute_slos(rows, now, window) if v.tenant == ALL and v.workflow == ALL]


def _slo_row(value: SloValue) -> tuple[str, str, str]:
    objective = OBJECTIVES[value.name]
    seconds = objective.unit == "seconds"

    def shown(number: float) -> str:
        return f"{number:.1f} s" if seconds else f"{number:.1%}"

    sign = "≥" if objective.at_least else "≤"
    current = "—" if value.value is None else shown(value.value)
    return (
        f"SLO {value.name}",
        current,
        f"objective {sign} {shown(value.objective)}, error budget left "
        f"{value.budget_left:.0%} (server log)",
    )
