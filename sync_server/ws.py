"""The WebSocket shell around ``ServerSession``: read, feed, run, write.

The connection's own task reads frames, decodes them and feeds the session. Two more
tasks exist only while they have something to do, so an idle connection costs one task:
the worker runs the session's store commands one at a time and feeds the answers back;
the writer sends queued frames. The send queue is bounded in frames and in bytes
(``send_queue_limit``, ``send_queue_bytes``): a client that cannot keep up is cut off
(close 1013) and catches up from its cursor when it comes back — nothing is lost,
because the log is the source of truth. A live batch that every subscriber forwards
whole is encoded once by the hub and the same bytes are queued on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import (
    BadMessage,
    Event,
    Events,
    Flags,
    Forbidden,
    Progress,
    Role,
    StorageError,
    TetherError,
    Unauthorized,
    Unavailable,
    decode_client_message,
    encode,
)
from sync_server.auth import Principal, bearer_token, verify_token
from sync_server.session import ApplyPush, Command, LoadClient, ReadEvents, ServerSession
from sync_server.sync_core import SessionCore

if TYPE_CHECKING:
    from sync_server.services import Services

__all__ = ["WsConnection", "sync_endpoint"]

log = logging.getLogger("tether.ws")

_CLOSE_SENTINEL = object()


async def sync_endpoint(websocket: WebSocket) -> None:
    """``GET /v1/sync``: authenticate on the upgrade, then run the sync session."""
    tether: Services = websocket.app.state.tether
    origin = websocket.headers.get("origin")
    try:
        principal = verify_token(
            tether.config.auth_secret, bearer_token(websocket.headers.get("authorization"))
        )
        principal.require(Role.CLIENT)
        if origin is not None and not tether.config.origin_allowed(origin):
            raise Forbidden(f"origin {origin!r} is not allowed")
    except (Unauthorized, Forbidden) as exc:
        # Refused before any data: accept only to be able to send the close code.
        await websocket.accept()
        await websocket.close(exc.close_code, exc.message[:120])
        return
    if tether.draining or tether.connections >= tether.config.max_connections:
        await websocket.accept()
        await websocket.close(1013, "server full or draining; try again later")
        return
    await websocket.accept()
    connection = WsConnection(tether, websocket, principal.tenant)
    tether.connection_opened(connection)
    try:
        await connection.run(principal)
    finally:
        tether.connection_closed(connection)


class WsConnection:
    """One WebSocket client: its session, its queues and its on-demand tasks."""

    __slots__ = (
        "_closing",
        "_commands",
        "_core",
        "_frames",
        "_queued_bytes",
        "_worker",
        "_writer",
        "principal",
        "session",
        "tenant",
        "tether",
        "websocket",
    )

    def __init__(self, tether: Services, websocket: WebSocket, tenant: str) -> None:
        self.tether = tether
        self.websocket = websocket
        self.tenant = tenant
        self.session = ServerSession(
            server_id=tether.config.server_id,
            page_size=tether.config.page_size,
            max_frame_bytes=tether.config.max_frame_bytes,
        )
        # Plain lists: an empty deque costs ~600 bytes, and idle connections are many.
        self._frames: list[bytes | object] = []
        self._queued_bytes = 0
        self._commands: list[Command] = []
        self._writer: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close (e.g. 1012 when the server drains)."""
        self.session.close(code, reason)
        self._pump()

    async def run(self, principal: Principal) -> None:
        """Serve the session until either side closes."""
        self.principal = principal
        self._core = SessionCore(self.tether, principal)
        # Subscribe before the first read so the catch-up/live hand-over has no gap.
        self.tether.hub.subscribe(self)
        try:
            await self._read()
            if self.session.closed and self._writer is not None:
                # Let the Error frame and the close code go out (bounded).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._writer), 5)
        finally:
            self.tether.hub.unsubscribe(self)
            for task in (self._worker, self._writer):
                if task is not None and not task.done():
                    task.cancel()
                    # Wait for our own task without taking on its CancelledError; a
                    # cancellation of this connection itself still propagates.
                    await asyncio.wait((task,))
                    if not task.cancelled() and task.exception() is not None:
                        log.warning("connection task failed: %r", task.exception())
            with contextlib.suppress(Exception):
                await self.websocket.close(self.session.close_code or 1000)

    # ------------------------------------------------------------- feeding
    def on_events(self, events: list[Event]) -> None:
        """The hub's live batch for this tenant (``Subscriber``)."""
        self.session.receive_live(events)
        self._pump()

    def on_flags(self, flags: Flags) -> None:
        """The tenant's flag set changed (``FlagService``)."""
        self.session.receive_flags(flags)
        self._pump()

    def on_progress(self, progress: Progress) -> None:
        """The hub's live progress for this tenant (``Subscriber``)."""
        self.session.receive_progress(progress)
        self._pump()

    def _pump(self) -> None:
        """Move the session's intents into the queues; start the worker/writer if idle."""
        self._commands.extend(self.session.commands_to_run())
        if self._commands and (self._worker is None or self._worker.done()):
            self._worker = asyncio.create_task(self._work(), name="tether-ws-work")
        config = self.tether.config
        for message in self.session.messages_to_send():
            if isinstance(message, Events) and not message.has_more:
                frame = self.tether.hub.frame_for(message)  # shared by every connection
            else:
                frame = encode(message)
            full = len(self._frames) >= config.send_queue_limit or (
                self._queued_bytes + len(frame) > config.send_queue_bytes and self._frames
            )
            if full and not self.session.closed:
                self.tether.metrics_slow_consumer()
                self.session.close(1013, "send queue full: reconnect and catch up")
                break
            self._frames.append(frame)
            self._queued_bytes += len(frame)
        if self.session.closed and not self._closing:
            self._closing = True
            self._frames.append(_CLOSE_SENTINEL)
        if self._frames and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write(), name="tether-ws-write")

    # --------------------------------------------------------------- tasks
    async def _read(self) -> None:
        hello_timeout = self.tether.config.hello_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hello_timeout
        while not self.session.closed:
            try:
                if self.session.client_id is None:
                    remaining = deadline - loop.time()
                    async with asyncio.timeout(max(remaining, 0.001)):
                        message = await self.websocket.receive()
                else:
                    message = await self.websocket.receive()
            except TimeoutError:
                self.session.fail(BadMessage(f"no Hello within {hello_timeout:g} s"))
                self._pump()
                return
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            try:
                if data is None:
                    raise BadMessage("expected a binary frame (msgpack), got text")
                decoded = decode_client_message(data, limit=self.tether.config.max_frame_bytes)
                self.session.receive_message(decoded)
            except TetherError as exc:
                self.session.fail(exc)
            self._pump()

    async def _work(self) -> None:
        core = self._core
        while self._commands:
            if self.session.closed:  # nothing more of a closed session is carried out
                self._commands.clear()
                return
            command = self._commands.pop(0)
            try:
                if isinstance(command, LoadClient):
                    state = await core.load_client(command)
                    self.session.receive_client_state(
                        state.last_mutation_id, state.head, state.horizon
                    )
                    # The current flags right after Welcome, before any push is answered.
                    self.session.receive_flags(state.flags)
                elif isinstance(command, ApplyPush):
                    self.session.receive_push_results(await core.push(command))
                elif isinstance(command, ReadEvents):
                    page, more = await core.read(command)
                    self.session.receive_page(page, has_more=more)
            except StorageError as exc:
                log.warning("storage failed during %s: %s", type(command).__name__, exc)
                self.session.fail(Unavailable(f"storage unavailable: {exc.message}"))
            except TetherError as exc:
                self.session.fail(exc)
            except Exception as exc:  # a bug: log it, close this session, keep the server
                log.exception("command %s failed", type(command).__name__)
                self.session.fail(TetherError(f"internal error: {type(exc).__name__}"))
            self._pump()

    async def _write(self) -> None:
        try:
            while self._frames:
                frame = self._frames.pop(0)
                if isinstance(frame, bytes):
                    self._queued_bytes -= len(frame)
                if frame is _CLOSE_SENTINEL:
                    await self.websocket.close(
                        self.session.close_code or 1000, self.session.close_reason
                    )
                    return
                assert isinstance(frame, bytes)
                await self.websocket.send_bytes(frame)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            # The peer went away mid-send; the reader notices the disconnect too.
            log.debug("send failed: %s", exc)
            self._frames.clear()
            self._queued_bytes = 0
