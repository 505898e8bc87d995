"""``sync-server``: serve, token (and the operator commands).

Settings come from flags, then the environment (``SYNC_DATABASE_URL``,
``SYNC_AUTH_SECRET``), then defaults. Errors print one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from protocol import Role, TetherError, UsageError
from sync_server.config import DEFAULT_DATABASE_URL

__all__ = ["load_workflows", "main", "serve_config"]

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
    return {
        "host": args.host,
        "port": args.port,
        "ws": "websockets-sansio",
        "ws_max_size": WS_MAX_SIZE,
        "ws_per_message_deflate": False,
        "log_level": args.log_level,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sync_server.app import create_app

    url = args.database or os.environ.get("SYNC_DATABASE_URL") or DEFAULT_DATABASE_URL
    app = create_app(url, workflows=load_workflows(args.workflows))
    uvicorn.run(app, **serve_config(args))
    return 0


def _secret() -> str:
    secret = os.environ.get("SYNC_AUTH_SECRET", "")
    if not secret:
        raise UsageError("SYNC_AUTH_SECRET is not set; it signs and verifies tokens")
    return secret


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
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.set_defaults(func=_cmd_serve)

    token = commands.add_parser("token", help="print a signed token (uses SYNC_AUTH_SECRET)")
    token.add_argument("--tenant", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument("--role", default="client", choices=[role.value for role in Role])
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.set_defaults(func=_cmd_token)
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
