"""``python -m bench.serve KIND --port P …``: the servers a run starts as child processes.

Kinds:

* ``tether`` — one Tether instance (``create_app``) under uvicorn with
  ``ws="websockets-sansio"`` and per-message deflate off (BENCH.md, LESSONS).
* ``relay`` — the raw limit of fan-out: a plain ``websockets`` server; whatever a client
  sends on ``/write`` is broadcast (``websockets.broadcast``) to every ``/read`` client.
* ``idle`` — the raw limit of B8: a plain ``websockets`` server holding idle clients.
* ``jobs`` — the job service of ``examples.job_service`` (faults off): ``POST /work``
  holds the request ``duration`` seconds; ``GET /stats`` counts attempts per
  idempotency key (B6, B7). A minimal stand-in is used if the example is missing.

Each uses uvloop when it is installed, for Tether and the raw servers alike.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench.procs import SECRET, raise_fd_limit
from bench.worker import install_uvloop


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _uvicorn(app: Any, port: int, backlog: int = 4096) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_max_size=4 * 1024 * 1024,
        ws_per_message_deflate=False,
        log_level="warning",
        lifespan="on",
        loop=_loop_name(),
        backlog=backlog,
        timeout_graceful_shutdown=5,
    )


def serve_tether(args: argparse.Namespace) -> None:
    """One Tether instance."""
    from bench.workflows import ALL
    from sync_server import create_app

    settings: dict[str, Any] = {"run_sagas": args.run_sagas, "lease_seconds": args.lease}
    if args.retention_interval:
        settings["retention_interval"] = args.retention_interval
    if args.server_id:
        settings["server_id"] = args.server_id
    app = create_app(args.database, workflows=ALL, auth_secret=SECRET, **settings)
    _uvicorn(app, args.port)


async def _relay(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    readers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        if path == "/write":
            async for message in ws:
                broadcast(readers, message)
            return
        readers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            readers.discard(ws)

    async with serve(
        handler, "127.0.0.1", port, compression=None, max_size=4 * 1024 * 1024, backlog=4096
    ) as server:
        await server.serve_forever()


async def _idle(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", port, compression=None, backlog=4096) as server:
        await server.serve_forever()


def jobs_app() -> Any:
    """The job service: ``examples.job_service`` when present, else a minimal stand-in
    with the same ``POST /work`` (``duration`` seconds) and ``GET /stats`` (attempts)."""
    try:
        from examples.job_service import create_job_service
    except ImportError:
        pass
    else:
        return create_job_service()
    from collections import Counter

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    attempts: Counter[str] = Counter()

    async def work(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key") or ""
        body = await request.json()
        attempts[key] += 1
        await asyncio.sleep(float(body.get("duration", 0.05)))
        return JSONResponse({"job_id": key, "result": f"image-for-{key}"})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"attempts": dict(attempts)})

    return Starlette(
        routes=[
            Route("/work", work, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("kind", choices=["tether", "relay", "idle", "jobs"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", default="")
    parser.add_argument("--run-sagas", action="store_true")
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--server-id", default="")
    parser.add_argument("--retention-interval", type=float, default=0.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.kind == "tether":
        serve_tether(args)
    elif args.kind == "jobs":
        _uvicorn(jobs_app(), args.port)
    else:
        install_uvloop()
        runner = _relay if args.kind == "relay" else _idle
        asyncio.run(runner(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
