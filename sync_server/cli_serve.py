"""``sync-server serve``: load the definitions, check the database, run uvicorn.

The server runs only the workflows it is given (``--workflows module:attr``); the
example pipeline is served only when asked for by name (``--workflows demo``), so the
server never imports the ``examples`` package on its own (``tests/test_layering.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence
from typing import Any

from protocol import UsageError
from sync_server.config import DEFAULT_DATABASE_URL

__all__ = [
    "DEMO",
    "check_database",
    "load_limits",
    "load_sources",
    "load_workflows",
    "run_serve",
    "serve_config",
]

DEMO = "demo"
"""``--workflows demo``: the example image pipeline, reconciled against the example job
service (``TETHER_JOB_SERVICE``)."""
DEMO_WORKFLOWS = "examples.image_pipeline:workflows"

WS_MAX_SIZE = 4 * 1024 * 1024
"""uvicorn's frame cap; frames between the protocol limit and this get 4413, above 1009."""


def load_workflows(spec: str | None) -> list[Any]:
    """Load ``module:attr`` (a Workflow or a list of them); ``demo`` is the example pipeline.

    Raises:
        UsageError: no spec, the module or attribute does not exist, or holds no workflows.
    """
    if not spec:
        raise UsageError(
            "serve needs the workflows to run: --workflows module:attr (a Workflow or a list "
            "of them, e.g. --workflows myapp.flows:workflows), or --workflows demo for the "
            "example image pipeline"
        )
    if spec == DEMO:
        spec = DEMO_WORKFLOWS
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


def run_serve(args: argparse.Namespace) -> int:
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
    sources, job_steps = load_sources(args.sources, args.job_step, default=args.workflows == DEMO)
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
    (``default``: ``--workflows demo``) is reconciled against the example job service
    (``TETHER_JOB_SERVICE``).

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
