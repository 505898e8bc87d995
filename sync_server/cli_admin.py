"""The operator commands of ``sync-server`` (workflows, dlq, slo): HTTP to a running server.

They talk to the server over HTTP, so a requeue wakes the instances at once whatever the
backend, with ``--token`` (or ``SYNC_TOKEN``), else a short-lived global admin token
minted from ``SYNC_AUTH_SECRET``. A tenant admin's token is held to its tenant by the
server.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from protocol import Role, TetherError, Unavailable, UsageError

__all__ = ["call", "cmd_dlq", "cmd_slo", "cmd_workflows", "list_workflows", "print_table", "secret"]


def _admin_client(args: argparse.Namespace) -> Any:
    import httpx

    from sync_server.auth import GLOBAL_TENANT, issue_token

    token = getattr(args, "token", None) or os.environ.get("SYNC_TOKEN") or ""
    if not token:
        token = issue_token(
            secret(), tenant=GLOBAL_TENANT, subject="sync-server-cli", role=Role.ADMIN, ttl=300
        )
    return httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """One admin request to ``args.url``; the decoded JSON body.

    Raises:
        Unavailable: the server cannot be reached.
        TetherError: it answered with an error status.
    """
    import httpx

    try:
        with _admin_client(args) as http:
            response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach the server at {args.url}: {exc}") from exc
    body = response.json() if response.content else {}
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise TetherError(
            f"{response.status_code} {error.get('code', '')}: {error.get('message', body)}"
        )
    return body


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(table)


def cmd_workflows(args: argparse.Namespace) -> int:
    """``sync-server workflows``."""
    if args.action == "show":
        if not args.id:
            raise UsageError("workflows show needs a workflow ID")
        params = {"tenant": args.tenant} if args.tenant else None
        view = call(args, "GET", f"/v1/workflows/{args.id}", params=params)
        rows = [
            [name, step["status"], step["attempts"], f"{step['progress']:.0%}", step["error"]]
            for name, step in view["steps"].items()
        ]
        print_table(
            f"{view['name']} {view['id']}: {view['status']} ({view['progress']:.0%})"
            + (f" — {view['error']}" if view.get("error") else ""),
            ["step", "status", "attempts", "progress", "error"],
            rows,
        )
        return 0
    if args.action == "upgrade":
        if not args.id or not args.version:
            raise UsageError("workflows upgrade needs a workflow ID and --version")
        view = call(
            args,
            "POST",
            f"/v1/workflows/{args.id}/upgrade",
            json={"version": args.version},
            params={"tenant": args.tenant} if args.tenant else None,
        )
        print(
            f"workflow {view['id']} now runs version {view['workflow_version']} ({view['status']})"
        )
        return 0
    listed = list_workflows(args)
    print_table(
        f"{len(listed)} workflows",
        ["id", "name", "version", "status", "progress", "error"],
        [
            [w["id"], w["name"], w.get("workflow_version"), w["status"], _percent(w), w["error"]]
            for w in listed
        ],
    )
    return 0


def _percent(view: dict[str, Any]) -> str:
    return f"{view['progress']:.0%}"


def list_workflows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Up to ``--limit`` workflows matching the filters, newest first (follows cursors).

    Raises:
        UsageError: ``--since`` is neither a duration nor a time, or ``--limit`` < 1.
    """
    from protocol import BadMessage
    from sync_server.listing import parse_since

    if args.limit < 1:
        raise UsageError("--limit must be >= 1")
    params: dict[str, Any] = {}
    for key in ("status", "name", "version"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.since:
        try:
            params["created_after"] = repr(parse_since(args.since, time.time()))
        except BadMessage as exc:
            raise UsageError(f"--since takes a duration (1h, 30m, 7d) or a time: {exc}") from exc
    listed: list[dict[str, Any]] = []
    while len(listed) < args.limit:
        params["limit"] = min(1000, args.limit - len(listed))
        page = call(args, "GET", "/v1/workflows", params=params)
        listed.extend(page["workflows"])
        if not page.get("next_cursor"):
            break
        params["cursor"] = page["next_cursor"]
    return listed


def cmd_dlq(args: argparse.Namespace) -> int:
    """``sync-server dlq``."""
    if args.action == "requeue":
        if not args.id:
            raise UsageError("dlq requeue needs a dead-letter ID")
        view = call(args, "POST", f"/v1/dlq/{args.id}/requeue")
        print(f"requeued dead letter {args.id}: workflow {view['id']} is {view['status']}")
        return 0
    entries = call(args, "GET", "/v1/dlq", params={"status": args.status})["entries"]
    print_table(
        f"{len(entries)} dead letters",
        ["id", "workflow", "step", "reason", "attempts", "last error", "status"],
        [
            [
                e["id"],
                e["workflow_id"],
                e["step"],
                e["reason"],
                e["attempts"],
                e["last_error"],
                e["status"],
            ]
            for e in entries
        ],
    )
    return 0


def cmd_slo(args: argparse.Namespace) -> int:
    """``sync-server slo``."""
    import json

    from sync_server.slo import JSON_FIELDS, parse_window

    try:
        parse_window(args.window)
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from exc
    params = {"window": args.window}
    if args.tenant:
        params["tenant"] = args.tenant
    if args.workflow:
        params["workflow"] = args.workflow
    slos = call(args, "GET", "/v1/slo", params=params)["slos"]
    if args.json:
        print(json.dumps([{key: slo[key] for key in JSON_FIELDS} for slo in slos], indent=2))
        return 0

    def shown(value: float | None, unit: str) -> str:
        if value is None:
            return "—"
        return f"{value:.1f} s" if unit == "seconds" else f"{value:.2%}"

    from sync_server.slo import OBJECTIVES

    rows = []
    for slo in slos:
        target = OBJECTIVES.get(slo["name"])
        unit = target.unit if target else "ratio"
        sign = "≥" if target is not None and target.at_least else "≤"
        rows.append(
            [
                slo["name"],
                f"{sign} {shown(slo['objective'], unit)}",
                shown(slo["value"], unit),
                f"{slo['budget_left']:.1%}",
                slo.get("samples", ""),
            ]
        )
    scope = f"tenant {slos[0]['tenant']}, workflow {slos[0]['workflow']}" if slos else ""
    print_table(
        f"SLOs over {args.window} ({scope})",
        ["slo", "objective", "value", "budget left", "samples"],
        rows,
    )
    return 0


def secret() -> str:
    """``SYNC_AUTH_SECRET``.

    Raises:
        UsageError: it is not set.
    """
    secret = os.environ.get("SYNC_AUTH_SECRET", "")
    if not secret:
        raise UsageError("SYNC_AUTH_SECRET is not set; it signs and verifies tokens")
    return secret
