"""``sync-server flags list|show|set|rollout|history`` — over HTTP, admin role.

Without ``--tenant`` a command acts on the flags of every tenant (scope ``*``); a tenant
admin's token is held to its own tenant by the server. ``--url``/``--token`` (env
``SYNC_SERVER_URL``, ``SYNC_TOKEN``); without a token a short-lived global admin token
is minted from ``SYNC_AUTH_SECRET``, as for ``workflows`` and ``dlq``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

import msgspec

from protocol import UsageError

__all__ = ["add_parser"]

_ACTIONS = ["list", "show", "set", "rollout", "history"]


def add_parser(commands: Any, default_url: str, url_help: str, token_help: str) -> None:
    """Add the ``flags`` command to the ``sync-server`` parser."""
    flags = commands.add_parser("flags", help="feature flags: list, show, set, rollout, history")
    flags.add_argument("action", choices=_ACTIONS)
    flags.add_argument("name", nargs="?", help="flag name (all but list)")
    flags.add_argument(
        "value",
        nargs="?",
        help='set: a JSON value (true, "blue", 3, {...}); rollout: a percentage 0..100',
    )
    flags.add_argument("--tenant", help="one tenant's flags (default: every tenant's)")
    flags.add_argument("--rules", help="set: a JSON list of targeting rules")
    flags.add_argument("--json", action="store_true", help="print the server's JSON answer")
    flags.add_argument("--url", default=default_url, help=url_help)
    flags.add_argument("--token", help=token_help)
    flags.set_defaults(func=run)


def _decode(text: str, what: str) -> Any:
    try:
        return msgspec.json.decode(text.encode())
    except msgspec.DecodeError as exc:
        raise UsageError(f"{what} must be JSON ({exc}); quote strings: '\"blue\"'") from exc


def run(args: argparse.Namespace) -> int:
    """Run one ``flags`` action."""
    from sync_server.cli_admin import call as _call
    from sync_server.cli_admin import print_table as _print_table

    params = {"tenant": args.tenant} if args.tenant else {}
    if args.action != "list" and not args.name:
        raise UsageError(f"flags {args.action} needs a flag NAME")
    path = f"/v1/flags/{quote(args.name, safe='')}" if args.name else "/v1/flags"
    if args.action == "set":
        if args.value is None:
            raise UsageError('flags set needs a VALUE (JSON: true, "blue", 3)')
        body: dict[str, Any] = {"value": _decode(args.value, "VALUE")}
        if args.rules:
            body["rules"] = _decode(args.rules, "--rules")
        answer = _call(args, "PUT", path, params=params, json=body)
    elif args.action == "rollout":
        try:
            percentage = float(args.value)
        except (TypeError, ValueError) as exc:
            raise UsageError("flags rollout needs a PERCENT from 0 to 100") from exc
        answer = _call(
            args, "POST", f"{path}/rollout", params=params, json={"percentage": percentage}
        )
    elif args.action == "history":
        answer = _call(args, "GET", f"{path}/history", params=params)
    else:
        answer = _call(args, "GET", path, params=params)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    if args.action in ("set", "rollout"):
        after = answer["after"]
        before = answer["before"]
        was = json.dumps(before["default"]) if before else "(new)"
        print(
            f"{after['name']} in scope {answer['scope']}: version {after['version']}, "
            f"default {json.dumps(after['default'])} (was {was}), {len(after['rules'])} rules"
        )
    elif args.action == "history":
        _print_table(
            f"history of {args.name}",
            ["version", "when", "by", "before", "after"],
            [
                [
                    h["version"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["at"])),
                    h["by"],
                    _brief(h["before"]),
                    _brief(h["after"]),
                ]
                for h in answer["history"]
            ],
        )
    else:
        rows = answer["flags"] if args.action == "list" else [answer]
        _print_table(
            f"{len(rows)} flags",
            ["scope", "name", "default", "rules", "version", "updated by"],
            [
                [
                    f["scope"] + (" (overridden)" if f.get("overridden") else ""),
                    f["name"],
                    json.dumps(f["default"]),
                    json.dumps(f["rules"]) if f["rules"] else "",
                    f["version"],
                    f["updated_by"],
                ]
                for f in rows
            ],
        )
    return 0


def _brief(flag: dict[str, Any] | None) -> str:
    if flag is None:
        return "(none)"
    rules = f" +{len(flag['rules'])} rules" if flag.get("rules") else ""
    return json.dumps(flag["default"]) + rules
