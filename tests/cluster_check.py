"""The checker of cluster runs: SPEC's promises decided from the records alone (Jepsen).

Inputs: the server's event log and workflow rows (``cluster.read_store``), the job
service's books (``GET /stats``), each client's side file of returned mutations and its
SQLite file. Nothing here looks at how the run went; ``check`` returns a ``Verdict``
whose ``checks`` list every invariant with its result, and ``Verdict.raise_first``
fails with the seed and the first broken invariant.

Invariants (SPEC promise in brackets):

* ``submit-exactly-once`` [1] — every returned ``submit_workflow`` id has exactly one
  ``workflow.submitted`` event; no workflow was submitted twice; nothing unknown exists.
* ``cancel-applied`` [1] — every returned cancel has a ``workflow.cancel_requested``
  event, or its workflow had already ended (the server rejects it).
* ``every-workflow-ends`` [2] — every workflow is terminal or parked, holding no lease.
* ``one-effect-per-key`` [3] — the job service applied at most one effect per key, one
  for each render that succeeded; no two live attempts of a key overlapped; every
  completed workflow's effects are in the ledger.
* ``compensation-exact`` [3] — a compensated or cancelled workflow compensated exactly
  its succeeded steps that have a compensation, in reverse dependency order, and the
  downstream saw the refund/cancel; a completed one compensated nothing.
* ``client-log-gapless`` [4] — each client's event log equals its tenant's server log up
  to the client's cursor, which reached the tenant's last event: no gap, no duplicate.
* ``client-views-converge`` [5] — each client's stored snapshot of every workflow of its
  tenant equals the server's; no mutation is left pending; it holds nothing else [6].
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import events as ev
from sync_server.saga.machine import idempotency_key

TERMINAL = {"completed", "compensated", "failed", "cancelled"}
ENDED = TERMINAL | {"parked"}
COMPENSATED_BY = {"reserve_credits": "refund", "render": "cancel"}
"""Steps of the image pipeline that have a compensation -> the ledger kind it writes."""
DEPENDS = {
    "render": ["reserve_credits"],
    "store": ["render"],
    "charge": ["store", "reserve_credits"],
}


@dataclass
class ClientRecord:
    """What one client left behind."""

    name: str
    tenant: str
    path: Path
    returned: list[tuple[str, str]]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    seed: int | str
    checks: list[Check] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    observed: Counter[str] = field(default_factory=Counter)
    """Faults seen in the records (timeouts, lease takeovers, job failures…)."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], summary: str = "") -> None:
        detail = "; ".join(problems[:5]) + (
            f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        self.checks.append(Check(name, not problems, detail if problems else summary))

    def raise_first(self) -> None:
        for check in self.checks:
            if not check.ok:
                raise AssertionError(
                    f"seed {self.seed}: invariant {check.name!r} broken: {check.detail}"
                )

    def summary(self) -> str:
        lines = [f"checker (seed {self.seed}):"]
        for check in self.checks:
            mark = "PASS" if check.ok else "FAIL"
            lines.append(f"  {mark} {check.name}: {check.detail}")
        lines.append("  workflows by outcome: " + _fmt(self.outcomes))
        lines.append("  faults seen in the records: " + _fmt(self.observed))
        return "\n".join(lines)


def _fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def _by_workflow(events: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        out[event.workflow_id].append(event)
    return out


def check(
    *,
    seed: int | str,
    events: list[Any],
    records: list[Any],
    expected_ids: set[str],
    job_stats: dict[str, Any],
    clients: list[ClientRecord],
) -> Verdict:
    """Decide every invariant; see the module docstring."""
    verdict = Verdict(seed)
    per_workflow = _by_workflow(events)
    by_id = {r.id: r for r in records}
    verdict.outcomes.update(r.status for r in records)

    # ---- 1. no loss, exactly once
    problems: list[str] = []
    submitted = Counter(e.workflow_id for e in events if e.type == ev.WORKFLOW_SUBMITTED)
    returned = [wid for c in clients for kind, wid in c.returned if kind == "submit"]
    for wid in returned:
        if submitted[wid] != 1:
            problems.append(f"returned submit {wid} has {submitted[wid]} submitted events")
    problems += [f"{wid} submitted {n} times" for wid, n in submitted.items() if n > 1]
    problems += [
        f"unknown workflow {wid} on the server" for wid in by_id if wid not in expected_ids
    ]
    problems += [f"workflow {wid} has no submitted event" for wid in by_id if not submitted[wid]]
    verdict.add(
        "submit-exactly-once",
        problems,
        f"{len(set(returned))} returned submits, {len(submitted)} on the server, each once",
    )

    problems = []
    cancels = [wid for c in clients for kind, wid in c.returned if kind == "cancel"]
    applied_cancels = 0
    for wid in cancels:
        requested = [e for e in per_workflow.get(wid, []) if e.type == ev.WORKFLOW_CANCEL_REQUESTED]
        record = by_id.get(wid)
        if requested:
            applied_cancels += 1
        elif record is None or record.status == "cancelled":
            problems.append(f"returned cancel of {wid} never applied")
    verdict.add(
        "cancel-applied",
        problems,
        f"{len(cancels)} returned cancels: {applied_cancels} applied, "
        f"{len(cancels) - applied_cancels} rejected (workflow had ended)",
    )

    # ---- 2. every workflow ends
    problems = [
        f"{r.id} is {r.status}" + (f" leased to {r.lease_owner}" if r.lease_owner else "")
        for r in records
        if r.status not in ENDED or r.lease_owner is not None
    ]
    verdict.add("every-workflow-ends", problems, f"{len(records)} workflows terminal or parked")

    # ---- 3. steps: one effect per key, no live overlap
    problems = []
    effects: dict[str, int] = job_stats.get("effects", {})
    ledger: dict[str, dict[str, int]] = job_stats.get("ledger", {})
    problems += [f"{key} has {n} effects" for key, n in effects.items() if n != 1]
    overlaps = job_stats.get("overlaps", [])
    problems += [f"overlapping live attempts of {key}" for key in overlaps]
    known_keys = {
        idempotency_key(r.id, step, tenant=r.tenant)
        for r in records
        for step in DEPENDS | {"reserve_credits": []}
    }
    for kind, keys in ledger.items():
        problems += [f"{kind} effect for unknown key {k}" for k in keys if k not in known_keys]
    for r in records:
        history = _step_statuses(per_workflow.get(r.id, []))
        render_key = idempotency_key(r.id, "render", tenant=r.tenant)
        if "succeeded" in history.get("render", ()) and effects.get(render_key) != 1:
            problems.append(f"{r.id}: render succeeded but the service has no effect for it")
        if r.status == "completed":
            for kind, step in (
                ("reserve", "reserve_credits"),
                ("store", "store"),
                ("charge", "charge"),
            ):
                if not ledger.get(kind, {}).get(idempotency_key(r.id, step, tenant=r.tenant)):
                    problems.append(f"completed {r.id}: no {kind} effect at the service")
    verdict.add(
        "one-effect-per-key",
        problems,
        f"{len(effects)} render effects, each once; {sum(job_stats.get('attempts', {}).values())}"
        f" attempts; no overlaps",
    )

    # ---- 3. compensation
    problems = []
    compensated_workflows = 0
    for r in records:
        wf_events = per_workflow.get(r.id, [])
        history = _step_statuses(wf_events)
        succeeded = {s for s, seen in history.items() if "succeeded" in seen}
        compensated = {s for s, seen in history.items() if "compensated" in seen}
        wanted = {s for s in succeeded if s in COMPENSATED_BY}
        if r.status == "completed":
            if compensated or any("compensating" in seen for seen in history.values()):
                problems.append(f"completed {r.id} compensated {sorted(compensated)}")
            continue
        if r.status in ("compensated", "cancelled"):
            compensated_workflows += 1
            if compensated != wanted:
                problems.append(
                    f"{r.status} {r.id}: compensated {sorted(compensated)}, succeeded "
                    f"{sorted(wanted)}"
                )
            order = _compensation_order(wf_events)
            for step in order:
                for dep in DEPENDS.get(step, []):
                    if dep in order and order.index(dep) < order.index(step):
                        problems.append(f"{r.id}: {dep} compensated before its dependent {step}")
            for step in compensated:
                kind = COMPENSATED_BY[step]
                if not ledger.get(kind, {}).get(idempotency_key(r.id, step, tenant=r.tenant)):
                    problems.append(f"{r.id}: {step} compensated but no {kind} at the service")
    verdict.add(
        "compensation-exact",
        problems,
        f"{compensated_workflows} compensated/cancelled workflows undid exactly their "
        "succeeded steps, in reverse order",
    )

    # ---- 4 and 5: the clients
    tenant_events: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        tenant_events[event.tenant].append(event)
    server_views = {r.id: _server_snapshot(r) for r in records}
    tenant_of = {r.id: r.tenant for r in records}
    gap_problems: list[str] = []
    view_problems: list[str] = []
    compared = 0
    for client in clients:
        local = _read_client(client.path)
        seqs = [e.seq for e in tenant_events[client.tenant]]
        cursor = local["cursor"]
        if local["seqs"] != [s for s in seqs if s <= cursor]:
            gap_problems.append(f"{client.name}: {_diff(local['seqs'], seqs, cursor)}")
        if seqs and cursor < seqs[-1]:
            gap_problems.append(f"{client.name}: cursor {cursor} below tenant head {seqs[-1]}")
        if local["pending"]:
            view_problems.append(f"{client.name}: {local['pending']} mutations left pending")
        mine = {wid for wid, t in tenant_of.items() if t == client.tenant}
        views = local["views"]
        for wid in mine:
            compared += 1
            view = views.get(wid)
            if view is None:
                view_problems.append(f"{client.name}: no view of {wid}")
            elif view != server_views[wid]:
                view_problems.append(f"{client.name}: {wid} {_view_diff(view, server_views[wid])}")
        foreign = [wid for wid in views if wid not in mine]
        view_problems += [f"{client.name}: holds {wid}, not of its tenant" for wid in foreign]
    verdict.add(
        "client-log-gapless",
        gap_problems,
        f"{len(clients)} clients' event logs equal their tenant's log, up to its head",
    )
    verdict.add(
        "client-views-converge",
        view_problems,
        f"{compared} client views equal the server's snapshots; nothing pending",
    )

    # ---- faults seen in the records
    for event in events:
        if event.type == ev.WORKFLOW_RECONCILED:
            verdict.observed["reconciliation repair"] += 1
        if event.type == ev.STEP_CHANGED:
            error = event.data.get("error") or ""
            if "timed out" in error:
                verdict.observed["step timeout"] += 1
            if "lease taken over" in error:
                verdict.observed["lease takeover"] += 1
    verdict.observed["job failure (503)"] += sum(job_stats.get("failures", {}).values())
    verdict.observed["job stall"] += sum(job_stats.get("stalls", {}).values())
    verdict.observed["lost completion"] += sum(job_stats.get("lost", {}).values())
    return verdict


def _step_statuses(wf_events: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for event in wf_events:
        if event.type == ev.STEP_CHANGED:
            out[event.data["step"]].append(event.data["status"])
    return out


def _compensation_order(wf_events: list[Any]) -> list[str]:
    """Steps in the order their compensation *started*."""
    order: list[str] = []
    for event in wf_events:
        step = event.data.get("step")
        if event.type == ev.STEP_CHANGED and event.data["status"] == "compensating":
            order += [] if step in order else [step]
    return order


def _server_snapshot(record: Any) -> dict[str, Any]:
    from sync_server.snapshots import snapshot_data

    return json.loads(json.dumps(snapshot_data(record)))


def _read_client(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
        cursor = int(conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])
        pending = conn.execute(
            "SELECT count(*) FROM mutations WHERE status = 'pending'"
        ).fetchone()[0]
        views = {
            wid: json.loads(snap)
            for wid, snap in conn.execute(
                "SELECT id, snapshot FROM workflows WHERE snapshot IS NOT NULL"
            )
        }
    finally:
        conn.close()
    return {"seqs": seqs, "cursor": cursor, "pending": pending, "views": views}


def _diff(local: list[int], server: list[int], cursor: int) -> str:
    wanted = [s for s in server if s <= cursor]
    missing = sorted(set(wanted) - set(local))
    extra = sorted(set(local) - set(wanted))
    dup = len(local) - len(set(local))
    return f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)}), {dup} dups"


def _view_diff(local: dict[str, Any], server: dict[str, Any]) -> str:
    keys = sorted(k for k in set(local) | set(server) if local.get(k) != server.get(k))
    return "differs in " + ", ".join(
        f"{k}: local {str(local.get(k))[:60]} vs server {str(server.get(k))[:60]}" for k in keys[:3]
    )
