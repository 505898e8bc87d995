"""``sync-server``: serve, demo, token, and the operator commands (workflows, dlq, slo).

``serve`` lives in ``cli_serve``, the operator commands (HTTP to a running server) in
``cli_admin``; ``demo`` imports the ``examples.demo`` package only when it runs.

Settings come from flags, then the environment (``SYNC_DATABASE_URL``,
``SYNC_AUTH_SECRET``), then defaults. Errors print one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from protocol import Role, TetherError, UsageError
from sync_server.cli_admin import cmd_dlq, cmd_slo, cmd_workflows, list_workflows, secret
from sync_server.cli_serve import (
    check_database,
    load_limits,
    load_sources,
    load_workflows,
    run_serve,
    serve_config,
)
from sync_server.config import DEFAULT_DATABASE_URL

__all__ = [
    "build_parser",
    "check_database",
    "list_workflows",
    "load_limits",
    "load_sources",
    "load_workflows",
    "main",
    "serve_config",
]


def _cmd_demo(args: argparse.Namespace) -> int:
    from examples.demo import DemoOptions, run_demo

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
            secret(), tenant=args.tenant, subject=args.subject, role=args.role, ttl=args.ttl
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
        help="module:attr holding the Workflow definitions (required; `demo` serves the "
        "example image pipeline)",
    )
    serve.add_argument(
        "--lease",
        type=float,
        help="saga lease in seconds: another instance resumes a dead one's work after it "
        "(default 10)",
    )
    serve.add_argument(
        "--sources",
        help="module:attr of reconciliation source adapters (default with --workflows demo: "
        "the example job service at TETHER_JOB_SERVICE)",
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
    serve.set_defaults(func=run_serve)

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
    workflows.set_defaults(func=cmd_workflows)

    dlq = commands.add_parser("dlq", help="list dead letters or requeue one")
    dlq.add_argument("action", choices=["list", "requeue"])
    dlq.add_argument("id", nargs="?", help="dead-letter id (for requeue)")
    dlq.add_argument("--status", default="open", help="open (default), requeued or all")
    dlq.add_argument("--url", default=default_url, help=url_help)
    dlq.add_argument("--token", help=token_help)
    dlq.set_defaults(func=cmd_dlq)

    slo = commands.add_parser("slo", help="the success metrics as SLOs, with error budgets")
    slo.add_argument("--window", default="24h", help="e.g. 1h, 24h, 7d (default 24h)")
    slo.add_argument("--tenant", help="one tenant (a tenant admin's token sees only its own)")
    slo.add_argument("--workflow", help="one workflow name (default: all)")
    slo.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    slo.add_argument("--url", default=default_url, help=url_help)
    slo.add_argument("--token", help=token_help)
    slo.set_defaults(func=cmd_slo)

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
