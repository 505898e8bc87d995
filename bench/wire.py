"""A small raw Tether protocol client for the bench (Hello, Push, live Events).

The SDK is measured where BENCH.md says "SDK" (B1, B1g, B4, B6, B7); elsewhere the
server is measured with this thin client so that client cost stays the same as in the
raw-limit runs it is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.procs import SECRET
from protocol import (
    PROTOCOL_VERSION,
    Events,
    Hello,
    Mutation,
    Push,
    PushResult,
    Welcome,
    decode_server_message,
    encode,
)

__all__ = ["WireClient", "connect_many", "submit", "token"]


def token(tenant: str = "bench", subject: str = "bench-client", role: str = "client") -> str:
    """A client token for the bench servers."""
    from sync_server.auth import issue_token

    return issue_token(SECRET, tenant=tenant, subject=subject, role=role, ttl=3600)


def submit(mutation_id: int, name: str = "noop", **input: Any) -> Mutation:
    """A ``submit_workflow`` mutation of a fresh workflow."""
    return Mutation(
        id=mutation_id,
        name="submit_workflow",
        args={"workflow_id": str(uuid.uuid4()), "name": name, "input": input},
        created_at=time.time(),
    )


EventSink = Callable[[Events, int, float], None]
"""``sink(events_message, frame_size, arrival_perf_counter)``."""


class WireClient:
    """One WebSocket session with a Tether server.

    A background reader hands live ``Events`` to ``on_events`` and resolves pushes.
    """

    def __init__(self, ws: ClientConnection, on_events: EventSink | None = None) -> None:
        self.ws = ws
        self.on_events = on_events
        self.welcome: Welcome | None = None
        self.next_id = 1
        self._push_waiter: asyncio.Future[PushResult] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        client_id: str | None = None,
        tenant: str = "bench",
        on_events: EventSink | None = None,
        tok: str | None = None,
        timeout: float = 30.0,
    ) -> WireClient:
        """Connect, say Hello (cursor 0) and wait for Welcome.

        Raises:
            TimeoutError: no Welcome within ``timeout`` seconds.
        """
        headers = {"Authorization": f"Bearer {tok or token(tenant)}"}
        async with asyncio.timeout(timeout):
            ws = await connect(
                f"{url}/v1/sync",
                additional_headers=headers,
                max_size=None,
                compression=None,
                open_timeout=timeout,
                ping_interval=None,
            )
            client = cls(ws, on_events)
            hello = Hello(
                client_id=client_id or uuid.uuid4().hex,
                protocol_version=PROTOCOL_VERSION,
                cursor=0,
            )
            await ws.send(encode(hello))
            while client.welcome is None:
                frame = await ws.recv()
                if not isinstance(frame, bytes):
                    raise ConnectionError("the server sent a text frame")
                message = decode_server_message(frame)
                if isinstance(message, Welcome):
                    client.welcome = message
        client._reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                arrived = time.perf_counter()
                assert isinstance(frame, bytes)
                message = decode_server_message(frame)
                if isinstance(message, Events):
                    if self.on_events is not None:
                        self.on_events(message, len(frame), arrived)
                elif isinstance(message, PushResult):
                    waiter, self._push_waiter = self._push_waiter, None
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
        except Exception:  # connection lost: the owner sees ``closed``
            pass
        finally:
            self.closed.set()
            waiter, self._push_waiter = self._push_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError("connection closed during a push"))

    async def push(self, mutations: Sequence[Mutation], timeout: float = 30.0) -> PushResult:
        """Send one Push and wait for its PushResult (one push in flight at a time)."""
        waiter: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()
        self._push_waiter = waiter
        await self.ws.send(encode(Push(mutations=list(mutations))))
        async with asyncio.timeout(timeout):
            return await waiter

    def mutations(self, count: int, name: str = "noop", **input: Any) -> list[Mutation]:
        """``count`` submit mutations with this client's next ids."""
        batch = [submit(self.next_id + i, name, **input) for i in range(count)]
        self.next_id += count
        return batch

    def abort(self) -> None:
        """Drop the TCP connection at once (no closing handshake)."""
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()
        if self._reader is not None:
            self._reader.cancel()

    async def close(self) -> None:
        """Close the connection; idempotent."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


async def connect_many(
    count: int,
    opener: Callable[[int], Any],
    *,
    concurrency: int = 64,
    deadline: float = 120.0,
) -> list[Any]:
    """Open ``count`` connections with ``opener(i)``, ``concurrency`` at a time.

    Raises:
        TimeoutError: not all opened within ``deadline`` seconds.
    """
    results: list[Any] = [None] * count
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            results[i] = await opener(i)

    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(one(i) for i in range(count)))
    except BaseException:
        # Do not leak the connections that did open.
        for opened in results:
            transport = getattr(getattr(opened, "ws", opened), "transport", None)
            if transport is not None:
                transport.abort()
        raise
    return results
