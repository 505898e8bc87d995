"""Async hygiene of the two connection shells (issue 12): a cancelled server
connection stays cancelled (its cleanup never swallows the caller's cancellation), and
the SDK connection does not keep a task per socket close forever."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from client_sdk.connection import SyncConnection
from client_sdk.session import SyncSession
from protocol import PROTOCOL_VERSION, Hello, Role, encode
from sync_server.auth import Principal
from sync_server.config import ServerConfig
from sync_server.ws import WsConnection
from tests.servers import SECRET

pytestmark = pytest.mark.timeout(30)


class _Socket:
    """A WebSocket whose client says Hello, then goes away when told to."""

    def __init__(self) -> None:
        self.frames = [encode(Hello(client_id="c1", protocol_version=PROTOCOL_VERSION))]
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.frames:
            return {"type": "websocket.receive", "bytes": self.frames.pop(0)}
        await self.gone.wait()
        return {"type": "websocket.disconnect"}

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


async def test_a_cancelled_server_connection_is_not_swallowed_by_its_cleanup() -> None:
    """The client goes away while the worker runs a store command; ``run`` cancels the
    worker, whose own cleanup takes a while, and is itself cancelled meanwhile (the
    server shuts down). That cancellation must come out of ``run``: the old cleanup
    awaited its tasks under ``suppress(BaseException)`` and returned normally."""
    entered, worker_cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Store:
        async def get_client(self, tenant: str, client_id: str) -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                worker_cancelled.set()
                await release.wait()  # a slow cleanup
                raise

    hub = SimpleNamespace(subscribe=lambda s: None, unsubscribe=lambda s: None)
    services: Any = SimpleNamespace(config=ServerConfig(auth_secret=SECRET), store=Store(), hub=hub)
    socket = _Socket()
    connection = WsConnection(services, socket, "acme")  # type: ignore[arg-type]
    principal = Principal(tenant="acme", subject="c1", role=Role.CLIENT)
    task = asyncio.create_task(connection.run(principal))
    await entered.wait()  # the worker runs the Hello's LoadClient
    socket.gone.set()
    await worker_cancelled.wait()  # run() is in its cleanup, waiting for the worker
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


class _ClosingSocket:
    def __init__(self) -> None:
        self.closes = 0

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closes += 1


async def test_sdk_close_tasks_are_dropped_once_done() -> None:
    connection = SyncConnection("ws://127.0.0.1:9", "t", SyncSession("c1"), handler=None)  # type: ignore[arg-type]
    socket = _ClosingSocket()
    connection._ws = socket  # type: ignore[assignment]
    for _ in range(50):
        connection._close_ws(1011, "again")
    pending = set(connection._closers)
    assert len(pending) == 50
    await asyncio.wait(pending)
    assert socket.closes == 50
    assert not connection._closers  # each task left the set when it ended
    assert connection._tasks == []
