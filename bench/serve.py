"""``python -m bench.serve KIND --port P …``: the servers a run starts as child processes.

Kinds:

* ``tether`` — one Tether instance (``create_app``) under uvicorn with
  ``ws="websockets-sansio"`` and per-message deflate off (BENCH.md, LESSONS).
* ``relay`` — the raw limit of fan-out: a plain ``websockets`` server; whatever a client
  sends on ``/write`` is broadcast (``websockets.broadcast``) to every ``/read`` client.
* ``idle`` — the raw limit of B8: a plain ``websockets`` server holding idle clients.
* ``jobs`` — a tiny job service (Starlette under uvicorn): ``POST /jobs`` sleeps
  ``duration`` seconds and answers; ``GET /calls`` lists the calls it saw (B6, B7).

Each uses uvloop when it is installed, for Tether and the raw servers alike.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
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
    """The job service's Starlette app."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    calls: list[dict[str, Any]] = []

    async def job(request: Request) -> JSONResponse:
        body = await request.json()
        started = time.time()
        calls.append(
            {
                "at": started,
                "key": request.headers.get("idempotency-key"),
                "attempt": int(request.headers.get("x-attempt", "0") or 0),
            }
        )
        await asyncio.sleep(float(body.get("duration", 0.05)))
        return JSONResponse({"ok": True, "key": body.get("key"), "started": started})

    async def list_calls(request: Request) -> JSONResponse:
        return JSONResponse(calls[-1000:])

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/jobs", job, methods=["POST"]),
            Route("/calls", list_calls, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
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
