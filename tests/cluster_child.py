"""The processes ``tests/cluster.py`` spawns: an SDK client, and the job service.

``python -m tests.cluster_child client ...``
    One SDK client with its own SQLite file. It submits its share of workflows (ids are
    deterministic, so a restarted client re-submits the same ids: idempotent) at a pace,
    cancels a few, and appends every *returned* mutation to a side file with fsync
    (``submit <id>`` / ``cancel <id>``) — the history the checker trusts. Then it
    flushes and prints ``SUBMITTED``. On ``finish <seq>`` (stdin) it waits until its
    cursor reaches ``seq`` with nothing pending, closes cleanly and prints ``FINISHED``.
    A watcher appends every connect/disconnect with its wall time and server id to a
    status file, so the harness can measure reconnect times.

``python -m tests.cluster_child job-service --port P``
    ``examples.job_service`` behind a middleware that ends an attempt when its caller
    hangs up (a timed-out step, a killed instance): only attempts whose caller still
    waits count as in flight, so the service's ``overlaps`` mean two *live* attempts of
    one key — the thing fencing must prevent.

``workflows`` (for ``sync-server serve --workflows tests.cluster_child:workflows``)
    The image pipeline against ``TETHER_JOB_SERVICE`` with a short render timeout
    (``TETHER_RENDER_TIMEOUT``, default 2.5 s) so that stalls become timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from typing import Any

NAMESPACE = uuid.UUID("6f1d7c1e-8a53-4f7e-9c39-0b6d1c2a7e11")


def workflow_id(run: str, client: int, i: int) -> str:
    """The deterministic id of the ``i``-th workflow of ``client`` in run ``run``."""
    return str(uuid.uuid5(NAMESPACE, f"{run}:{client}:{i}"))


def workflow_input(seed: int, client: int, i: int, faults: bool) -> dict[str, Any]:
    """A seeded render plan: mostly quick jobs, some failing first, some always failing."""
    rng = random.Random(f"{seed}:{client}:{i}")
    render: dict[str, Any] = {"duration": round(rng.uniform(0.05, 0.6), 3)}
    roll = rng.random()
    if roll < 0.06:
        render["fail_always"] = True  # exhausts its attempts: compensation
    elif roll < 0.2:
        render["fail_first"] = rng.randint(1, 2)
    elif faults and roll < 0.27:
        render["stall_first"] = 1  # the first attempt times out
        render["stall"] = 4.0
    elif faults and roll < 0.3:
        render["lose_first"] = 1  # done, but the answer never comes: times out
        render["stall"] = 4.0
    return {"prompt": f"p{client}-{i}", "credits": rng.randint(1, 5), "render": render}


HEAVY_INPUT = 60_000
"""Largest reference-image stand-in of the heavy variant (under the 64 KiB input cap)."""
HEAVY_DETAIL = 12_000
"""Detail of the heavy variant's state reports (under the 16 KiB detail cap)."""


def heavy_input(seed: int, client: int, i: int, faults: bool, backlog: bool) -> dict[str, Any]:
    """``workflow_input`` plus a reference image of 0..60 KB (50..60 KB for the client
    that goes offline with a large backlog)."""
    data = workflow_input(seed, client, i, faults)
    rng = random.Random(f"{seed}:{client}:{i}:image")
    size = rng.randint(50_000, HEAVY_INPUT) if backlog else rng.randint(0, HEAVY_INPUT)
    data["image"] = "i" * size
    return data


# ---------------------------------------------------------------------- workflows


def _workflows() -> list[Any]:
    from examples.image_pipeline import build_pipeline
    from sync_server.saga import RetryPolicy

    url = os.environ.get("TETHER_JOB_SERVICE", "http://127.0.0.1:8701")
    timeout = float(os.environ.get("TETHER_RENDER_TIMEOUT", "2.5"))
    return [
        build_pipeline(
            url,
            render_timeout=timeout,
            render_retry=RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=2.0, multiplier=2),
            # No shared breaker here: its 30 s reset would dominate a short CI run; the
            # breaker has its own fault tests (test_saga_breaker, test_saga_runner).
            breaker=None,
        )
    ]


def sources() -> list[Any]:
    """The job service as the reconciliation source (``serve --sources``)."""
    from examples.job_service import JobServiceSource

    return [JobServiceSource(os.environ.get("TETHER_JOB_SERVICE", "http://127.0.0.1:8701"))]


def __getattr__(name: str) -> Any:
    # Built on first use, so importing this module (the harness does) needs no env.
    if name == "workflows":
        return _workflows()
    raise AttributeError(name)


# ------------------------------------------------------------------------ client


class SideFile:
    """An append-only file of returned mutations; each line is fsynced before the next."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, kind: str, wid: str) -> None:
        os.write(self.fd, f"{kind} {wid}\n".encode())
        os.fsync(self.fd)

    @staticmethod
    def read(path: str) -> list[tuple[str, str]]:
        try:
            with open(path) as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        # A line cut by SIGKILL mid-write has no newline: it never counted as recorded.
        return [tuple(line.split(" ", 1)) for line in lines[:-1] if line]  # type: ignore[misc]


async def _watch_connection(client: Any, status_path: str) -> None:
    """Append ``<wall time> up <server_id>`` / ``<wall time> down`` on every change."""
    # A small local file, line-buffered: blocking writes of a few bytes are fine here.
    out = open(status_path, "a", buffering=1)  # noqa: ASYNC230, SIM115
    try:
        out.write(f"{time.time():.4f} start -\n")
        was: str | None = None
        while True:
            now = (client.connected and client.session.server_id) or None
            if now != was:
                state = f"up {now}" if now else "down -"
                out.write(f"{time.time():.4f} {state}\n")
                was = now
            await asyncio.sleep(0.01)
    finally:
        out.close()


async def _stdin_lines() -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "eof")

    import threading

    threading.Thread(target=reader, daemon=True).start()
    return queue


async def run_client(args: argparse.Namespace) -> None:
    from client_sdk import SyncClient
    from client_sdk.backoff import Backoff, CircuitBreaker

    commands = await _stdin_lines()
    side = SideFile(args.returned)
    already = {wid for kind, wid in SideFile.read(args.returned) if kind == "submit"}
    cancelled = {wid for kind, wid in SideFile.read(args.returned) if kind == "cancel"}
    client = SyncClient(
        args.url,
        token=args.token,
        path=args.path,
        backoff=Backoff(base=0.05, cap=1.0),
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.5),
        stall_timeout=4.0,
        open_timeout=5.0,
    )
    await client.start()
    watcher = asyncio.create_task(_watch_connection(client, args.status))
    print(f"STARTED {client.client_id} {client.cursor} {client.pending_count}", flush=True)
    rng = random.Random(f"{args.seed}:{args.index}:pace")
    for i in range(args.count):
        wid = workflow_id(args.run, args.index, i)
        fresh = wid not in already
        if fresh and args.interval > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * args.interval)
        if args.heavy:
            data = heavy_input(args.seed, args.index, i, args.faults, args.index == 0)
        else:
            data = workflow_input(args.seed, args.index, i, args.faults)
        await client.submit_workflow("generate_image", data, workflow_id=wid)
        if fresh:
            side.record("submit", wid)
        if args.heavy and i % 3 == 2:
            await _report_large(client, [workflow_id(args.run, args.index, j) for j in range(i)])
        due = args.cancel_every and i % args.cancel_every == args.cancel_every - 1
        if due and wid not in cancelled:
            await client.cancel_workflow(wid)
            side.record("cancel", wid)
    print("QUEUED", flush=True)
    while True:
        try:
            await client.flush(timeout=5)
            break
        except TimeoutError:
            continue
    print(f"SUBMITTED {client.cursor}", flush=True)
    while True:
        line = await commands.get()
        if line == "eof":
            break
        if line.startswith("finish"):
            target = int(line.split()[1])
            while client.cursor < target or client.pending_count:
                await client.flush(timeout=60)
                await asyncio.sleep(0.02)
            break
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    cursor = client.cursor
    await client.close()
    print(f"FINISHED {cursor}", flush=True)


async def _report_large(client: Any, ids: list[str]) -> None:
    """Report the newest confirmed view among ``ids`` with a large detail (heavy variant)."""
    for wid in reversed(ids):
        view = client.get_workflow(wid)
        if view is not None and not view.pending and view.version > 0:
            await client.report_state(wid, detail={"log": "r" * HEAVY_DETAIL, "seen": view.status})
            return


# ---------------------------------------------------------------------- job service


class CancelOnDisconnect:
    """ASGI middleware: a request whose client hangs up is cancelled (its attempt ends).

    The body is read first and replayed to the app; meanwhile a watcher waits for
    ``http.disconnect`` and cancels the app's task if it comes before the answer.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.Future()  # the app never needs more

        app = asyncio.ensure_future(self.app(scope, replay, send))
        hangup = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({app, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done():
                app.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await app
        finally:
            hangup.cancel()
            app.cancel()


def run_job_service(args: argparse.Namespace) -> None:
    import uvicorn

    from examples.job_service import JobBooks, create_job_service

    books = JobBooks(rng=random.Random(args.seed), stall_seconds=args.stall)
    uvicorn.run(
        CancelOnDisconnect(create_job_service(books)),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="off",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    client = commands.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--token", required=True)
    client.add_argument("--path", required=True)
    client.add_argument("--returned", required=True)
    client.add_argument("--status", required=True)
    client.add_argument("--index", type=int, required=True)
    client.add_argument("--count", type=int, required=True)
    client.add_argument("--run", required=True)
    client.add_argument("--seed", type=int, default=1)
    client.add_argument("--interval", type=float, default=0.1)
    client.add_argument("--cancel-every", type=int, default=0)
    client.add_argument("--faults", action="store_true")
    client.add_argument("--heavy", action="store_true")
    jobs = commands.add_parser("job-service")
    jobs.add_argument("--port", type=int, required=True)
    jobs.add_argument("--seed", type=int, default=7)
    jobs.add_argument("--stall", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.command == "client":
        asyncio.run(run_client(args))
    else:
        run_job_service(args)


if __name__ == "__main__":
    main()
