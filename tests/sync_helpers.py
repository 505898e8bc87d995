"""A tiny raw protocol client for server tests (the SDK has its own tests)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Events,
    Hello,
    Mutation,
    Push,
    PushResult,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
)
from sync_server.auth import issue_token
from sync_server.saga.definitions import Step, Workflow
from tests.servers import SECRET


async def _noop(ctx: Any) -> dict[str, Any]:
    return {}


NOOP = Workflow("noop", [Step("only", _noop)])


SUITE_TOKEN_TTL = 6 * 3600.0
"""TTL of a token built once at import: it must outlive the slowest whole-suite run."""


def token(tenant: str = "acme", subject: str = "c1", role: str = "client", ttl: float = 600) -> str:
    return issue_token(SECRET, tenant=tenant, subject=subject, role=role, ttl=ttl)


def submit(mid: int, workflow_id: str | None = None, name: str = "noop") -> Mutation:
    return Mutation(
        id=mid,
        name="submit_workflow",
        args={"workflow_id": workflow_id or str(uuid.uuid4()), "name": name, "input": {"n": mid}},
        created_at=1.0,
    )


class RawClient:
    """Speaks the wire protocol by hand; collects events in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[Any] = []
        self.welcome: Welcome | None = None
        self.cursor = 0
        self._acks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        tok: str | None = None,
        client_id: str = "c1",
        cursor: int = 0,
        hello: bool = True,
    ) -> RawClient:
        headers = {"Authorization": f"Bearer {tok or token()}"}
        ws = await connect(f"{url}/v1/sync", additional_headers=headers, max_size=None)
        client = cls(ws)
        if hello:
            await ws.send(
                encode(Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION, cursor=cursor))
            )
            first = await client.recv()
            assert isinstance(first, Welcome), first
            client.welcome = first
        return client

    async def recv(self) -> ServerMessage:
        return decode_server_message(await self.ws.recv())

    async def push(self, mutations: list[Mutation]) -> PushResult:
        await self.ws.send(encode(Push(mutations=mutations)))
        while True:
            message = await self.recv()
            if isinstance(message, PushResult):
                return message
            self._take(message)

    def _take(self, message: ServerMessage) -> None:
        if isinstance(message, Events):
            self.events.extend(message.events)
            self.cursor = message.cursor
            ack = asyncio.get_running_loop().create_task(
                self.ws.send(encode(Ack(cursor=message.cursor)))
            )
            self._acks.add(ack)
            ack.add_done_callback(self._ack_sent)

    def _ack_sent(self, task: asyncio.Task[None]) -> None:
        # An Ack that meets a closed socket is moot (the test then asserts the close):
        # retrieve its error so it is not reported as "never retrieved".
        self._acks.discard(task)
        if not task.cancelled():
            task.exception()

    async def collect_until(self, count: int, timeout: float = 10.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self._take(await self.recv())
        return self.events

    async def close(self) -> None:
        await self.ws.close()


async def close_code_of(ws: ClientConnection, timeout: float = 10.0) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
