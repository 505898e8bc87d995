"""The demo's server process: one Tether instance on the embedded database.

``python -m examples.demo.server --port P --database sqlite:///… --job-service URL``
(the auth secret comes from ``SYNC_AUTH_SECRET``). It is a child process of the demo so
the demo can SIGKILL it and start it again; the short lease (``LEASE_SECONDS``) lets the
new process resume the dead one's workflows within seconds (SPEC promise 2).
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from examples.demo.pipeline import BREAKERS, build_workflows
from sync_server.app import create_app

__all__ = ["LEASE_SECONDS", "main"]

LEASE_SECONDS = 3.0
"""Saga lease of the demo server: a killed server's work resumes after at most this."""


def main(argv: list[str] | None = None) -> None:
    """Serve until stopped (SIGTERM drains, SIGKILL is the demo's crash)."""
    parser = argparse.ArgumentParser(description="Tether demo server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--job-service", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # alerts land in server.log
    app = create_app(
        args.database, workflows=build_workflows(args.job_service), lease_seconds=LEASE_SECONDS
    )
    tether = app.state.tether
    tether.runner_options = {"breakers": BREAKERS, "poll_interval": 0.25}
    tether.monitor_interval = 1.0
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="critical",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()
