"""A render farm test double: a downstream that takes jobs and records, from its own
side, how many ran at once, when each started, and who (instance, version) called it.

It behaves like the farm of issue 18: a job holds a worker for ``duration`` seconds; the
farm never refuses, so only Tether's limits keep it within its capacity — which the
books then show (``max_active``). Served on uvicorn in a thread, like the job service.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def split_key(key: str) -> tuple[str, str]:
    """(workflow id, step) of an idempotency key (``[tenant tag.]id:step``)."""
    head, _, step = key.partition(":")
    return head.rsplit(".", 1)[-1], step


@dataclass
class FarmBooks:
    """What the farm saw (mutated only on the farm's loop)."""

    active: dict[str, int] = field(default_factory=dict)
    """Jobs running now, by step (the part of the idempotency key after the id)."""
    max_active: dict[str, int] = field(default_factory=dict)
    starts: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    """(time, idempotency key, tenant, instance, version) of every job start."""
    calls: dict[str, int] = field(default_factory=dict)


def create_farm(books: FarmBooks) -> Starlette:
    async def render(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        key = request.headers.get("idempotency-key", "")
        step = split_key(key)[1]
        books.active[step] = books.active.get(step, 0) + 1
        books.max_active[step] = max(books.max_active.get(step, 0), books.active[step])
        books.starts.append(
            (
                time.time(),
                key,
                str(body.get("tenant", "")),
                request.headers.get("x-instance", ""),
                request.headers.get("x-version", ""),
            )
        )
        books.calls[key] = books.calls.get(key, 0) + 1
        try:
            await asyncio.sleep(float(body.get("duration", 0.0)))
        finally:
            books.active[step] -= 1
        return JSONResponse({"key": key})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"max_active": books.max_active, "starts": len(books.starts)})

    return Starlette(routes=[Route("/render", render, methods=["POST"]), Route("/stats", stats)])


class FarmThread:
    """The farm on uvicorn in a background thread."""

    def __init__(self) -> None:
        self.books = FarmBooks()
        config = uvicorn.Config(
            create_farm(self.books),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="farm")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FarmThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("farm did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)


@contextlib.contextmanager
def running_farm() -> Iterator[FarmThread]:
    farm = FarmThread().start()
    try:
        yield farm
    finally:
        farm.stop()
