"""A small, real, flaky job service (Starlette on uvicorn, loopback) for tests and the demo.

It stands in for the downstream an image pipeline calls, and it keeps the books a test
needs to check SPEC promise 3 (one effect per idempotency key):

* ``POST /work`` (header ``Idempotency-Key``; JSON ``duration``, ``fail_first``,
  ``stall_first``, ``stall``, ``fail_always``) runs a job and holds the request until it
  is done. Every request is an *attempt*; two attempts of one key in flight at once are
  recorded as an *overlap*. A key's effect is applied once, when its first attempt
  completes; later attempts get the stored result back (``duplicate: true``).
  It fails (HTTP 503) for the first ``fail_first`` attempts of a key, for every attempt
  with ``fail_always``, and at random with the configured ``fail_rate``; it stalls
  (sleeps ``stall`` seconds before answering) the first ``stall_first`` attempts and at
  random with ``stall_rate``.
  ``drop_first`` loses the first attempts outright (never registered, the request hangs
  for ``stall`` seconds: "a job the queue never heard of"); ``lose_first`` completes
  the job but holds the answer for ``stall`` seconds ("a lost completion callback").
* ``GET /jobs/{key}`` reports a job (``unknown``/``running``/``done``, progress 0..1,
  and the result when done); ``JobServiceSource`` reads it for reconciliation.
* ``POST /effects/{kind}`` (header ``Idempotency-Key``) applies a small idempotent
  effect: ``reserve``, ``refund``, ``charge``, ``store``, ``cancel``… counted per key.
* ``GET /stats`` returns the books; ``POST /config`` changes the fault rates.

Run it alone: ``python -m examples.job_service --port 8701``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = [
    "JobBooks",
    "JobServiceSource",
    "JobServiceThread",
    "Stopping",
    "create_job_service",
    "main",
    "running_job_service",
]


@dataclass
class JobBooks:
    """Everything the service saw (read it from tests; mutated only on the service loop)."""

    fail_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    attempts: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    stalls: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    active: Counter[str] = field(default_factory=Counter)
    overlaps: list[str] = field(default_factory=list)
    traceparents: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """W3C traceparent header of each attempt of a key, in arrival order."""
    progress: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def stats(self) -> dict[str, Any]:
        """A JSON-ready copy of the books."""
        return {
            "attempts": dict(self.attempts),
            "effects": dict(self.effects),
            "duplicates": dict(self.duplicates),
            "failures": dict(self.failures),
            "stalls": dict(self.stalls),
            "dropped": dict(self.dropped),
            "lost": dict(self.lost),
            "overlaps": list(self.overlaps),
            "ledger": {kind: dict(keys) for kind, keys in self.ledger.items()},
        }


class Stopping:
    """Wakes the service's deliberately long waits (stalls, lost jobs) when it stops.

    uvicorn gives in-flight requests ``timeout_graceful_shutdown`` seconds, then cancels
    them and logs each ``CancelledError`` as an "Exception in ASGI application"
    traceback. A stall lasts up to ``stall_seconds`` (30 s) and a job its ``duration``,
    so ``stop()`` cuts the waits short instead: each answers at once and shutdown has
    nothing to cancel. A real cancellation of a request still propagates.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Name the loop the service runs on (``set`` must reach it thread-safely)."""
        with self._lock:
            self._loop = loop
            if self._stopped:
                loop.call_soon_threadsafe(self._event.set)

    def set(self) -> None:
        """The service is stopping: end every current and future wait (any thread)."""
        with self._lock:
            self._stopped = True
            loop = self._loop
        if loop is None:
            return  # not serving: nothing waits, and bind() sets the event
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(self._event.set)

    @property
    def stopped(self) -> bool:
        """True once ``set()`` was called (any thread)."""
        return self._stopped

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True if cut short because the service is stopping."""
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return False
        return True


def create_job_service(
    books: JobBooks | None = None, stopping: Stopping | None = None
) -> Starlette:
    """The Starlette app of the job service; its books are ``app.state.books``.

    Args:
        books: the books to keep (a fresh ``JobBooks`` if None).
        stopping: set it to end the long waits before shutting the server down.
    """
    state = books or JobBooks()
    stop = stopping or Stopping()

    async def work(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "Idempotency-Key header required"}, status_code=400)
        body = await request.json() if await request.body() else {}
        state.attempts[key] += 1
        attempt = state.attempts[key]
        if "traceparent" in request.headers:
            # Like a real OpenTelemetry-instrumented queue, it continues the caller's trace.
            state.traceparents[key].append(request.headers["traceparent"][:64])
        if attempt <= int(body.get("drop_first", 0)):
            # The queue loses the job: never registered, the caller waits in vain.
            state.dropped[key] += 1
            await stop.sleep(float(body.get("stall", state.stall_seconds)))
            return JSONResponse({"error": "job lost"}, status_code=504)
        if key in state.results:
            state.duplicates[key] += 1
            return JSONResponse({**state.results[key], "duplicate": True})
        state.active[key] += 1
        if state.active[key] > 1:
            state.overlaps.append(key)
        try:
            stall = float(body.get("stall", state.stall_seconds))
            if attempt <= int(body.get("stall_first", 0)) or state.rng.random() < state.stall_rate:
                state.stalls[key] += 1
                if await stop.sleep(stall):
                    return JSONResponse({"error": "job service stopping"}, status_code=503)
            if (
                body.get("fail_always")
                or attempt <= int(body.get("fail_first", 0))
                or state.rng.random() < state.fail_rate
            ):
                state.failures[key] += 1
                return JSONResponse({"error": "job service unavailable"}, status_code=503)
            duration = float(body.get("duration", 0.0))
            chunks = max(1, int(duration / 0.02))
            for i in range(chunks):
                # A job still running when the service stops ends now (no effect) rather
                # than be cancelled by uvicorn's graceful-shutdown timeout, which logs
                # a CancelledError traceback (``sync-server demo`` ended with one).
                if duration:
                    await asyncio.sleep(duration / chunks)
                if stop.stopped:  # noticed within one chunk (20 ms), no wait per chunk
                    return JSONResponse({"error": "job service stopping"}, status_code=503)
                state.progress[key] = (i + 1) / chunks
            if key not in state.results:  # another attempt may have finished meanwhile
                state.effects[key] += 1
                state.results[key] = {"job_id": key, "result": f"image-for-{key}"}
            if attempt <= int(body.get("lose_first", 0)):
                # Done, but the completion never reaches the caller (a lost callback).
                state.lost[key] += 1
                await stop.sleep(float(body.get("stall", state.stall_seconds)))
            return JSONResponse(state.results[key])
        finally:
            state.active[key] -= 1

    async def job(request: Request) -> JSONResponse:
        key = request.path_params["key"]
        done = key in state.results
        return JSONResponse(
            {
                "state": "done" if done else "running" if key in state.progress else "unknown",
                "progress": 1.0 if done else state.progress.get(key, 0.0),
                "result": state.results.get(key),
            }
        )

    async def effect(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "Idempotency-Key header required"}, status_code=400)
        kind = request.path_params["kind"]
        state.ledger[kind][key] += 1
        return JSONResponse({"kind": kind, "key": key, "times": state.ledger[kind][key]})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(state.stats())

    async def config(request: Request) -> JSONResponse:
        body = await request.json()
        for name in ("fail_rate", "stall_rate", "stall_seconds"):
            if name in body:
                setattr(state, name, float(body[name]))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/work", work, methods=["POST"]),
            Route("/jobs/{key:path}", job, methods=["GET"]),
            Route("/effects/{kind}", effect, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/config", config, methods=["POST"]),
        ]
    )
    app.state.books = state
    app.state.stopping = stop
    return app


class JobServiceThread:
    """The job service on uvicorn in a background thread (its own event loop).

    Args:
        books: the books to keep (a fresh ``JobBooks`` if None).
        port: the port (0: any free one).
    """

    def __init__(self, books: JobBooks | None = None, port: int = 0) -> None:
        self.books = books or JobBooks()
        self._stopping = Stopping()
        config = uvicorn.Config(
            create_job_service(self.books, self._stopping),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="job-service")
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> JobServiceThread:
        """Start serving; returns when the port is bound.

        Raises:
            RuntimeError: the server did not start within ``timeout`` seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("job service did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def _serve(self) -> None:
        async def serve() -> None:
            self._stopping.bind(asyncio.get_running_loop())
            await self.server.serve()

        asyncio.run(serve())

    def stop(self) -> None:
        """Stop serving and join the thread; stalled requests answer at once (503/504)."""
        self._stopping.set()
        self.server.should_exit = True
        self._thread.join(timeout=5)


@contextlib.contextmanager
def running_job_service(books: JobBooks | None = None) -> Iterator[JobServiceThread]:
    """``with running_job_service() as svc: ... svc.url ... svc.books``."""
    service = JobServiceThread(books).start()
    try:
        yield service
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve the job service in the foreground."""
    parser = argparse.ArgumentParser(description="Tether's flaky job service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--stall-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    books = JobBooks(fail_rate=args.fail_rate, stall_rate=args.stall_rate)
    uvicorn.run(create_job_service(books), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()


class JobServiceSource:
    """The job service as a reconciliation source (``sync_server.reconcile``).

    Args:
        url: base URL of the job service.
        source: the source name in the canonical rule.
        timeout: seconds per lookup.
    """

    def __init__(self, url: str, *, source: str = "job-queue", timeout: float = 5.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.source = source
        self._http = httpx.AsyncClient(timeout=timeout)

    async def job_status(self, workflow: Any, step: str, key: str) -> Any:
        """Ask ``GET /jobs/{key}``: unknown, running or completed (with the result)."""
        from sync_server.reconcile import JobState

        response = await self._http.get(f"{self.url}/jobs/{key}")
        response.raise_for_status()
        body = response.json()
        state = {"done": "completed", "running": "running"}.get(body.get("state"), "unknown")
        result = body.get("result")
        if state == "completed" and isinstance(result, dict):
            result = {"job_id": result.get("job_id"), "image": result.get("result")}
        return JobState(status=state, result=result, at=time.time())

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()
