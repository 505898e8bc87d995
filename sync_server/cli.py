"""``sync-server``: serve, demo, token, and the operator commands (workflows, dlq, slo).

The operator commands talk to a running server over HTTP — so a requeue wakes the
instances at once, whatever the backend — with ``--token`` (or ``SYNC_TOKEN``), else a
short-lived global admin token minted from ``SYNC_AUTH_SECRET``. A tenant admin's token
is held to its tenant by the server.

Settings come from flags, then the environment (``SYNC_DATABASE_URL``,
``SYNC_AUTH_SECRET``), then defaults. Errors print one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from protocol import Role, TetherError, Unavailable, UsageError
from sync_server.config import DEFAULT_DATABASE_URL

__all__ = [
    "build_parser",
    "check_database",
    "list_workflows",
    "load_limits",
    "load_workflows",
    "main",
    "serve_config",
]

WS_MAX_SIZE = 4 * 1024 * 1024
"""uvicorn's frame cap; frames between the protocol limit and this get 4413, above 1009."""


def load_workflows(spec: str | None) -> list[Any]:
    """Load ``module:attr`` (a Workflow or a list of them).

    Raises:
        UsageError: the module or attribute does not exist, or holds no workflows.
    """
    if not spec:
        from examples.image_pipeline import workflows

        return list(workflows)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--workflows must look like module:attribute, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import workflow module {module_name!r}: {exc}") from exc
    try:
        value = getattr(module, attr)
    except AttributeError as exc:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from exc
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items or not all(hasattr(item, "name") and hasattr(item, "steps") for item in items):
        raise UsageError(f"{spec} is not a Workflow or a list of Workflows")
    return items


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn settings for ``serve``."""
    from sync_server.httpguard import header_deadline_protocol

    if not args.header_timeout > 0:
        raise UsageError(f"--header-timeout must be positive, got {args.header_timeout}")
    return {
        "host": args.host,
        "port": args.port,
        # Half-open connections are cut (issue 11): uvicorn has no header timeout.
        "http": header_deadline_protocol(args.header_timeout),
        "ws": "websockets-sansio",
        "ws_max_size": WS_MAX_SIZE,
        "ws_per_message_deflate": False,
        "log_level": args.log_level,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }


def check_database(url: str) -> None:
    """Open and close the store once, so a bad URL or a database that is down gives one
    clear line before the server starts.

    Raises:
        UsageError: the URL's scheme is not supported.
        StorageError: the database is unreachable or refuses the schema.
    """
    import asyncio

    from sync_server.store import open_store

    async def probe() -> None:
        store = open_store(url)
        await store.open()
        await store.close()

    asyncio.run(probe())


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sync_server.app import create_app

    config = serve_config(args)  # checks the options before anything starts
    url = args.database or os.environ.get("SYNC_DATABASE_URL") or DEFAULT_DATABASE_URL
    workflows = load_workflows(args.workflows)
    settings: dict[str, Any] = {}
    if args.lease is not None:
        if args.lease <= 0:
            raise UsageError("--lease must be > 0 seconds")
        settings["lease_seconds"] = args.lease
    sources, job_steps = load_sources(args.sources, args.job_step, default=not args.workflows)
    limits = load_limits(args.limits)
    app = create_app(
        url,
        workflows=workflows,
        sources=sources,
        job_steps=job_steps,
        limits=limits,
        **settings,
    )
    check_database(url)
    if args.log_format == "json":
        from sync_server.logs import configure_logging

        configure_logging(args.log_level)
        config["log_config"] = None  # uvicorn's loggers propagate to the JSON handler
    from sync_server.httpguard import raise_fd_limit

    raise_fd_limit()  # each connection, half-open or not, holds a descriptor
    uvicorn.run(app, **config)
    return 0


def load_sources(
    spec: str | None, job_steps: Sequence[str] | None, *, default: bool
) -> tuple[list[Any], dict[str, str]]:
    """The reconciliation sources and job steps for ``serve``.

    ``spec`` is ``module:attr`` naming a list of source adapters (or a callable returning
    one); ``job_steps`` are ``WORKFLOW=STEP`` pairs. With neither, the example pipeline
    (``default``) is reconciled against the example job service (``TETHER_JOB_SERVICE``).

    Raises:
        UsageError: a bad spec or pair.
    """
    steps: dict[str, str] = {}
    for pair in job_steps or ():
        name, sep, step = pair.partition("=")
        if not sep or not name or not step:
            raise UsageError(f"--job-step must look like WORKFLOW=STEP, not {pair!r}")
        steps[name] = step
    if spec is None:
        if not default:
            return [], steps
        from examples.image_pipeline import job_steps as example_steps
        from examples.job_service import JobServiceSource

        url = os.environ.get("TETHER_JOB_SERVICE", "http://127.0.0.1:8701")
        return [JobServiceSource(url)], {**example_steps, **steps}
    module_name, _, attr = spec.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"cannot load sources {spec!r}: {exc}") from exc
    items = value() if callable(value) else value
    sources = list(items)
    if not all(hasattr(source, "job_status") for source in sources):
        raise UsageError(f"{spec} is not a list of source adapters (with job_status)")
    return sources, steps


def load_limits(spec: str | None) -> dict[str, Any]:
    """The named limits for ``serve --limits module:attr`` (a dict name -> ``Limit``).

    Raises:
        UsageError: the spec is malformed, cannot be imported, or is not such a dict.
    """
    if not spec:
        return {}
    from sync_server.saga.definitions import Limit

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--limits must look like module:attribute, not {spec!r}")
    try:
        value: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load limits {spec!r}: {exc}") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, Limit) for k, v in value.items()
    ):
        raise UsageError(f"{spec} is not a dict of limit name -> Limit")
    return dict(value)


def _admin_client(args: argparse.Namespace) -> Any:
    import httpx

    from sync_server.auth import GLOBAL_TENANT, issue_token

    token = getattr(args, "token", None) or os.environ.get("SYNC_TOKEN") or ""
    if not token:
        token = issue_token(
            _secret(), tenant=GLOBAL_TENANT, subject="sync-server-cli", role=Role.ADMIN, ttl=300
        )
    return httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
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


def _print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(table)


def _cmd_workflows(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.id:
            raise UsageError("workflows show needs a workflow ID")
        params = {"tenant": args.tenant} if args.tenant else None
        view = _call(args, "GET", f"/v1/workflows/{args.id}", params=params)
        rows = [
            [name, step["status"], step["attempts"], f"{step['progress']:.0%}", step["error"]]
            for name, step in view["steps"].items()
        ]
        _print_table(
            f"{view['name']} {view['id']}: {view['status']} ({view['progress']:.0%})"
            + (f" — {view['error']}" if view.get("error") else ""),
            ["step", "status", "attempts", "progress", "error"],
            rows,
        )
        return 0
    if args.action == "upgrade":
        if not args.id or not args.version:
            raise UsageError("workflows upgrade needs a workflow ID and --version")
        view = _call(
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
    _print_table(
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
        page = _call(args, "GET", "/v1/workflows", params=params)
        listed.extend(page["workflows"])
        if not page.get("next_cursor"):
            break
        params["cursor"] = page["next_cursor"]
    return listed


def _cmd_dlq(args: argparse.Namespace) -> int:
    if args.action == "requeue":
        if not args.id:
            raise UsageError("dlq requeue needs a dead-letter ID")
        view = _call(args, "POST", f"/v1/dlq/{args.id}/requeue")
        print(f"requeued dead letter {args.id}: workflow {view['id']} is {view['status']}")
        return 0
    entries = _call(args, "GET", "/v1/dlq", params={"status": args.status})["entries"]
    _print_table(
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


def _cmd_slo(args: argparse.Namespace) -> int:
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
    slos = _call(args, "GET", "/v1/slo", params=params)["slos"]
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
    _print_table(
        f"SLOs over {args.window} ({scope})",
        ["slo", "objective", "value", "budget left", "samples"],
        rows,
    )
    return 0


def _secret() -> str:
    secret = os.environ.get("SYNC_AUTH_SECRET", "")
    if not secret:
        raise UsageError("SYNC_AUTH_SECRET is not set; it signs and verifies tokens")
    return secret


def _cmd_demo(args: argparse.Namespace) -> int:
    from sync_server.demo import DemoOptions, run_demo

    if args.workflows < 1 or args.clients < 1 or args.seconds <= 0:
        raise UsageError("--workflows and --clients must be >= 1, --seconds > 0")
    if args.clients > args.workflows:
        raise UsageError("--clients cannot exceed --workflows (each client submits some)")
    options = DemoOptions(
        workflows=args.workflows,
        clients=args.clients,
        seconds=args.seconds,
        seed=args.seed,
        faults=not args.no_faults,
        quiet=args.quiet,
        keep=args.keep,
    )
    return run_demo(options)


def _cmd_token(args: argparse.Namespace) -> int:
    from sync_server.auth import issue_token

    print(
        issue_token(
            _secret(), tenant=args.tenant, subject=args.subject, role=args.role, ttl=args.ttl
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sync-server``."""
    parser = argparse.ArgumentParser(
        prog="sync-server", description="Tether sync server: offline-first workflow sync."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one server instance")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8700, help="port (default 8700)")
    serve.add_argument(
        "--database",
        help=f"database URL (env SYNC_DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    serve.add_argument(
        "--workflows",
        help="module:attr holding the Workflow definitions (default: the example pipeline)",
    )
    serve.add_argument(
        "--lease",
        type=float,
        help="saga lease in seconds: another instance resumes a dead one's work after it "
        "(default 10)",
    )
    serve.add_argument(
        "--sources",
        help="module:attr of reconciliation source adapters (default with the example "
        "pipeline: the example job service at TETHER_JOB_SERVICE)",
    )
    serve.add_argument(
        "--job-step",
        action="append",
        metavar="WORKFLOW=STEP",
        help="the step of WORKFLOW whose job runs at the sources (repeatable)",
    )
    serve.add_argument(
        "--limits",
        help="module:attr of a dict of named limits (name -> sync_server.Limit) for steps "
        "declared with Step(..., limit=NAME)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, with workflow_id, step, attempt and trace_id "
        "where known (default text)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send complete request headers (default 10)",
    )
    serve.set_defaults(func=_cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="the main job: server, flaky job service, SDK clients, faults, live report",
        description=(
            "Run a server on an embedded database, a flaky job service and several SDK "
            "clients that submit image-generation workflows while faults are injected; "
            "show live progress, then a report read from the server and the job service. "
            "Exits 0 only if nothing was lost or duplicated. Needs no set-up."
        ),
    )
    demo.add_argument("--workflows", type=int, default=48, help="workflows in total (default 48)")
    demo.add_argument("--clients", type=int, default=3, help="SDK client processes (default 3)")
    demo.add_argument(
        "--seconds", type=float, default=20.0, help="submission window with faults (default 20)"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of inputs and faults (default 7)")
    demo.add_argument("--no-faults", action="store_true", help="inject no faults")
    demo.add_argument("--quiet", action="store_true", help="plain lines, no live view (CI)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.set_defaults(func=_cmd_demo)

    token = commands.add_parser("token", help="print a signed token (uses SYNC_AUTH_SECRET)")
    token.add_argument("--tenant", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument("--role", default="client", choices=[role.value for role in Role])
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.set_defaults(func=_cmd_token)

    url_help = "server URL (default http://127.0.0.1:8700; env SYNC_SERVER_URL)"
    token_help = "admin token (env SYNC_TOKEN; default: minted from SYNC_AUTH_SECRET)"
    default_url = os.environ.get("SYNC_SERVER_URL", "http://127.0.0.1:8700")
    workflows = commands.add_parser(
        "workflows", help="list workflows, show one, or move one to another version"
    )
    workflows.add_argument("action", choices=["list", "show", "upgrade"])
    workflows.add_argument("id", nargs="?", help="workflow id (for show and upgrade)")
    workflows.add_argument("--status", help="only workflows with this status (for list)")
    workflows.add_argument(
        "--tenant", help="the workflow's tenant (for show and upgrade; ids are per tenant)"
    )
    workflows.add_argument("--name", help="only workflows of this name (for list)")
    workflows.add_argument(
        "--version",
        help="list: only workflows of this definition version; upgrade: the version to move to",
    )
    workflows.add_argument(
        "--since", help="only workflows created since: a duration (1h, 30m, 7d) or a time"
    )
    workflows.add_argument(
        "--limit", type=int, default=100, help="most workflows listed (default 100)"
    )
    workflows.add_argument("--url", default=default_url, help=url_help)
    workflows.add_argument("--token", help=token_help)
    workflows.set_defaults(func=_cmd_workflows)

    dlq = commands.add_parser("dlq", help="list dead letters or requeue one")
    dlq.add_argument("action", choices=["list", "requeue"])
    dlq.add_argument("id", nargs="?", help="dead-letter id (for requeue)")
    dlq.add_argument("--status", default="open", help="open (default), requeued or all")
    dlq.add_argument("--url", default=default_url, help=url_help)
    dlq.add_argument("--token", help=token_help)
    dlq.set_defaults(func=_cmd_dlq)

    slo = commands.add_parser("slo", help="the success metrics as SLOs, with error budgets")
    slo.add_argument("--window", default="24h", help="e.g. 1h, 24h, 7d (default 24h)")
    slo.add_argument("--tenant", help="one tenant (a tenant admin's token sees only its own)")
    slo.add_argument("--workflow", help="one workflow name (default: all)")
    slo.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    slo.add_argument("--url", default=default_url, help=url_help)
    slo.add_argument("--token", help=token_help)
    slo.set_defaults(func=_cmd_slo)

    from sync_server.flags.cli import add_parser as add_flags_parser

    token_help = "admin token (env SYNC_TOKEN; default: minted from SYNC_AUTH_SECRET)"
    add_flags_parser(commands, default_url, url_help, token_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sync-server``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except TetherError as exc:
        print(f"sync-server: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
