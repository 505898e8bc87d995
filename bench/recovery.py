"""B7 — recovery: SIGKILL an instance mid-step.

Per repeat, on one PostgreSQL schema: instance A starts (sagas on, a short lease so the
run stays short), a ``job`` workflow is submitted whose job holds 60 s, and once the job
service has seen the step's first attempt, instance B starts and SDK clients connect
through a small TCP balancer (``Balancer``: the first backend that accepts wins, as a
load balancer with health checks would route). Then A is SIGKILLed. Measured from the
kill:

* **resume** — until the job service sees the step's second attempt (from B). Raw limit:
  the lease timeout itself; target lease + 1 s.
* **reconnect** — until each SDK client is connected again (through the balancer, to B);
  p99 over the clients; target ≤ 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from bench.core import Context, Row, Stat, figure, percentile, verdict
from bench.procs import SECRET, child
from bench.wire import WireClient, submit

__all__ = ["Balancer"]

LEASE = 3.0
"""Lease timeout of the instances under test (seconds)."""


class Balancer:
    """A TCP proxy on 127.0.0.1 that sends each new connection to the first backend that
    accepts it, and cuts the client side when the backend side closes."""

    def __init__(self, backends: Sequence[int]) -> None:
        self.backends = list(backends)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for port in self.backends:
            with contextlib.suppress(OSError):
                upstream = await asyncio.open_connection("127.0.0.1", port)
                break
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)


async def _attempts(http: httpx.AsyncClient, jobs_url: str, key: str) -> int:
    response = await http.get(f"{jobs_url}/stats")
    return int(response.json().get("attempts", {}).get(key, 0))


async def _wait_attempts(
    http: httpx.AsyncClient, jobs_url: str, key: str, count: int, timeout: float
) -> float:
    """Poll the job service until ``key`` has ``count`` attempts; returns time.time()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _attempts(http, jobs_url, key) >= count:
            return time.time()
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{key}: fewer than {count} attempts after {timeout} s")


async def _one(ctx: Context, url: str, jobs_url: str, clients: int) -> dict[str, Any]:
    from client_sdk import SyncClient
    from sync_server.auth import issue_token
    from sync_server.saga.machine import idempotency_key

    lease = ["--run-sagas", "--lease", str(LEASE)]
    async with (
        httpx.AsyncClient(timeout=5) as http,
        child("tether", ["--database", url, *lease], logdir=ctx.workdir) as a,
    ):
        writer = await WireClient.open(a.ws_url, tenant="bench-b7")
        mutation = submit(1, "job", url=f"{jobs_url}/work", duration=60.0)
        await writer.push([mutation])
        await writer.close()
        key = idempotency_key(mutation.args["workflow_id"], "call", tenant="bench-b7")
        await _wait_attempts(http, jobs_url, key, 1, 30)
        async with child("tether", ["--database", url, *lease], logdir=ctx.workdir) as b:
            balancer = Balancer([a.port, b.port])
            await balancer.start()
            token = issue_token(SECRET, tenant="bench-b7", subject="b7")
            sdk = [
                SyncClient(
                    f"ws://127.0.0.1:{balancer.port}",
                    token=token,
                    path=str(ctx.path("b7-client.db")),
                )
                for _ in range(clients)
            ]
            try:
                for client in sdk:
                    await client.start()
                async with asyncio.timeout(30):
                    # The SDK exposes ``connected`` as a property only: poll it.
                    while not all(c.connected for c in sdk):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                killed = time.time()
                a.kill()
                back: dict[int, float] = {}

                async def watch() -> None:
                    seen_down: set[int] = set()
                    async with asyncio.timeout(30):
                        while len(back) < len(sdk):
                            for i, c in enumerate(sdk):
                                if not c.connected:
                                    seen_down.add(i)
                                elif i in seen_down and i not in back:
                                    back[i] = time.time() - killed
                            await asyncio.sleep(0.005)

                watcher = asyncio.create_task(watch())
                resumed = await _wait_attempts(http, jobs_url, key, 2, LEASE + 30)
                await watcher
            finally:
                await asyncio.gather(*(c.close() for c in sdk), return_exceptions=True)
                await balancer.stop()
    return {"resume": resumed - killed, "reconnect": sorted(back.values())}


def _missing() -> str | None:
    try:
        from client_sdk import SyncClient  # noqa: F401
        from sync_server.saga.runner import SagaRunner  # noqa: F401
    except ImportError as exc:
        return f"the SDK or the saga runner cannot be imported ({exc})"
    return None


@figure("B7")
async def b7(ctx: Context) -> list[Row]:
    """Resume of a killed instance's step elsewhere; reconnect of its clients."""
    missing = _missing()
    if missing:
        return [Row.unavailable("B7", missing, "resume ≤ lease + 1 s; reconnect p99 ≤ 5 s")]
    clients = ctx.size(20, 5)
    runs = []
    async with child("jobs", [], logdir=ctx.workdir) as jobs:
        for i in range(ctx.repeats):
            ctx.say(f"B7: kill an instance mid-step, repeat {i + 1}/{ctx.repeats}")
            url = await ctx.pg_url(f"b7_{uuid.uuid4().hex[:6]}")
            runs.append(await _one(ctx, url, jobs.http_url, clients))
    resume = Stat.of([r["resume"] for r in runs], "s")
    lease = Stat.of([LEASE] * len(runs), "s")
    reconnect = Stat.of([percentile(r["reconnect"], 99) for r in runs], "s")
    return [
        Row(
            "B7",
            "SIGKILL mid-step → step resumes on another instance",
            tether=resume,
            raw=lease,
            raw_label="the lease timeout",
            ratio=resume.median / LEASE,
            target="≤ lease + 1 s",
            passed=verdict(ctx, resume.max <= LEASE + 1),
            details={"lease_seconds": LEASE},
        ),
        Row(
            "B7",
            f"SIGKILL → its {clients} SDK clients reconnected (p99)",
            tether=reconnect,
            target="≤ 5 s",
            passed=verdict(ctx, reconnect.median <= 5),
            details={"per_client_s": [r["reconnect"] for r in runs]},
        ),
    ]
