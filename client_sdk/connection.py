"""The thin I/O shell around ``SyncSession``: WebSocket, HTTP fallback, reconnects.

It only reads, feeds the session, writes, awaits and times out; every protocol rule
lives in ``client_sdk.session``. One long-lived *applier* task runs the session's
durable commands (apply a page, settle mutations, store snapshots) strictly in order,
across reconnects, so an Ack is sent only after its page committed.

Reconnect loop: a circuit breaker guards connecting and exponential backoff with full
jitter spaces attempts (``client_sdk.backoff``); both reset after a Welcome. When the
WebSocket *upgrade* itself is refused ``fallback_after`` times in a row (an HTTP
answer other than 101 — a proxy that does not pass WebSockets), the shell syncs over
``POST /v1/push`` and ``GET /v1/pull`` for ``ws_retry_interval`` seconds, then tries the
WebSocket again. A connection that owes a reply but sends no frame for
``stall_timeout`` seconds is cut and reconnected; keepalive pings catch idle stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from client_sdk.backoff import Backoff, CircuitBreaker
from client_sdk.httppoll import run_http
from client_sdk.session import (
    ApplyEvents,
    ApplyFlags,
    Close,
    Command,
    FetchSnapshots,
    Settle,
    ShowProgress,
    Stop,
    SyncSession,
)
from client_sdk.tasks import cancel_and_wait
from protocol import (
    MAX_FRAME_BYTES,
    Event,
    Flags,
    Progress,
    ProtocolError,
    TetherError,
    decode_server_message,
    encode,
)
from protocol.http import WorkflowPage

__all__ = ["SyncConnection", "SyncHandler"]

log = logging.getLogger("client_sdk")

SNAPSHOT_LIMIT = 10_000
"""Snapshots a progressive sync or a reset fetches at most (newest first)."""


class SyncHandler(Protocol):
    """What the shell asks of its owner (the ``SyncClient``): durable work and news."""

    async def apply_events(self, events: list[Event], cursor: int) -> None: ...
    async def settle(self, results: list[tuple[int, bool, str | None]]) -> None: ...
    async def apply_snapshots(self, snapshots: list[dict[str, Any]]) -> None: ...
    async def reset(
        self, snapshots: list[dict[str, Any]], *, horizon: int, complete: bool
    ) -> None: ...
    def show_progress(self, progress: Progress) -> None: ...
    def apply_flags(self, flags: Flags) -> None: ...
    def state_changed(self) -> None: ...


class _UpgradeRefused(Exception):
    """The server (or a proxy) answered the upgrade with something other than 101."""


def http_base(url: str) -> str:
    """``ws://h:p/x`` → ``http://h:p/x`` (and wss → https); http(s) URLs pass through."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def ws_url(url: str) -> str:
    """The ``/v1/sync`` endpoint for a base URL given as ws(s):// or http(s)://."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/sync", "", ""))


class SyncConnection:
    """Runs a ``SyncSession`` over the network until closed or stopped.

    Args:
        url: the server's base URL (``ws://host:port`` or ``http://host:port``).
        token: the bearer token.
        session: the pure session core.
        handler: the owner that performs durable work.
        backoff: reconnect delays (default: 0.1 s doubling to 10 s, full jitter).
        breaker: guards connecting (default: opens after 5 failures for 15 s).
        clock: monotonic seconds (injected for tests).
        stall_timeout: seconds without a frame while a reply is owed before reconnecting.
        open_timeout: seconds for the TCP + upgrade handshake.
        http_fallback: allow polling over HTTP when upgrades keep being refused.
        fallback_after: consecutive refused upgrades before falling back.
        http_poll_interval: seconds between pulls in HTTP mode when idle.
        ws_retry_interval: seconds in HTTP mode before trying the WebSocket again.
    """

    def __init__(
        self,
        url: str,
        token: str,
        session: SyncSession,
        handler: SyncHandler,
        *,
        backoff: Backoff | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        stall_timeout: float = 15.0,
        open_timeout: float = 10.0,
        http_fallback: bool = True,
        fallback_after: int = 2,
        http_poll_interval: float = 1.0,
        ws_retry_interval: float = 30.0,
    ) -> None:
        self.url = ws_url(url)
        self.http_url = http_base(url)
        self._headers = {"Authorization": f"Bearer {token}"}
        self.session = session
        self.handler = handler
        self.backoff = backoff or Backoff()
        self.breaker = breaker or CircuitBreaker()
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.open_timeout = open_timeout
        self.http_fallback = http_fallback
        self.fallback_after = fallback_after
        self.http_poll_interval = http_poll_interval
        self.ws_retry_interval = ws_retry_interval
        self.transport: str | None = None
        """``"websocket"`` or ``"http"`` while connected, else None."""
        self.refused_upgrades = 0
        self.connects = 0
        self.closing = asyncio.Event()
        self.wake = asyncio.Event()
        self._work: asyncio.Queue[Command] = asyncio.Queue()
        self._busy = 0
        self.idle_event = asyncio.Event()
        self.idle_event.set()
        self._ws: ClientConnection | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        """Socket closes in flight; each leaves the set when done."""

    # ------------------------------------------------------------------ API
    @property
    def connected(self) -> bool:
        """Synced with the server right now (after Welcome, or polling over HTTP)."""
        return self.transport is not None and self.session.synced

    @property
    def idle(self) -> bool:
        """No durable work queued or running."""
        return self._busy == 0 and self._work.empty()

    def start(self) -> None:
        """Start the reconnect loop and the applier."""
        self._tasks = [
            asyncio.create_task(self._applier(), name="tether-applier"),
            asyncio.create_task(self._run(), name="tether-sync"),
        ]

    def kick(self) -> None:
        """The session may have something to send (e.g. a new mutation)."""
        self.wake.set()

    async def close(self) -> None:
        """Stop syncing and wait for the tasks to end; idempotent."""
        self.closing.set()
        self.wake.set()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(1001, "client closing"), 2)
        tasks = [*self._tasks, *self._closers]
        for task in tasks:
            task.cancel()
        if tasks:
            # Waits without taking on the tasks' CancelledError; if *this* call is
            # cancelled, that propagates. A task that failed otherwise is re-raised.
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        if self._http is not None:
            await self._http.aclose()

    # ----------------------------------------------------------- command pump
    def pump(self) -> None:
        for command in self.session.commands_to_run():
            if isinstance(command, ShowProgress):
                self.handler.show_progress(command.progress)
            elif isinstance(command, ApplyFlags):
                self.handler.apply_flags(command.flags)
            elif isinstance(command, Close):
                log.warning("closing the connection: %s", command.error.message)
                self._close_ws(command.error.close_code, command.error.message)
            elif isinstance(command, Stop):
                log.error("sync stopped: %s (%s)", command.error.message, command.error.code)
                self.closing.set()
                self._close_ws(1000, "sync stopped")
                self.handler.state_changed()
            else:
                self.idle_event.clear()
                self._work.put_nowait(command)
        self.wake.set()

    def _close_ws(self, code: int, reason: str) -> None:
        ws = self._ws
        if ws is None:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await ws.close(code, reason[:120])

        task = asyncio.create_task(close(), name="tether-ws-close")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _applier(self) -> None:
        while True:
            command = await self._work.get()
            self._busy += 1
            try:
                if isinstance(command, ApplyEvents):
                    await self.handler.apply_events(command.events, command.cursor)
                    self.session.events_applied(command.cursor)
                elif isinstance(command, Settle):
                    await self.handler.settle(command.results)
                elif isinstance(command, FetchSnapshots):
                    await self._fetch_snapshots(command)
            except asyncio.CancelledError:
                raise
            except TetherError as exc:
                # A durable write failed: the cursor did not advance, so the data will
                # be fetched again; reconnect to start from the durable state.
                log.error("local apply failed (%s); resyncing", exc.message)
                self.session.received_cursor = self.session.cursor
                self._close_ws(1011, "local store failure")
            finally:
                self._busy -= 1
            if self._work.empty():
                self.idle_event.set()
            self.pump()
            self.handler.state_changed()

    async def _fetch_snapshots(self, command: FetchSnapshots) -> None:
        try:
            response = await self.http_client().get(
                "/v1/workflows", params={"limit": SNAPSHOT_LIMIT}
            )
            response.raise_for_status()
            page = msgspec.json.decode(response.content, type=WorkflowPage)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            if command.reset:
                log.warning("reset fetch failed (%s); reconnecting to try again", exc)
                self._abort_reset()
            else:
                log.info("snapshot prefetch failed (%s); the backlog will still converge", exc)
            return
        # Typed on the wire; the local store keeps snapshots as the JSON they arrived as.
        found = page.workflows
        snapshots: list[dict[str, Any]] = msgspec.to_builtins(found)
        if not command.reset:
            log.info("progressive sync: %d current snapshots fetched", len(snapshots))
            await self.handler.apply_snapshots(snapshots)
            return
        log.warning(
            "cursor %d is behind the server's retention horizon %d (older events were "
            "pruned): reset from %d current snapshots, pending mutations kept",
            self.session.cursor,
            command.horizon,
            len(snapshots),
        )
        await self.handler.reset(
            snapshots, horizon=command.horizon, complete=len(found) < SNAPSHOT_LIMIT
        )

    def _abort_reset(self) -> None:
        """A reset could not fetch its snapshots: drop the pages queued behind it (they
        must not move the cursor past the pruned events) and reconnect."""
        kept: list[Command] = []
        while not self._work.empty():
            command = self._work.get_nowait()
            if not isinstance(command, ApplyEvents):
                kept.append(command)
        for command in kept:
            self._work.put_nowait(command)
        self.session.reset_failed()
        self._close_ws(1011, "reset failed; reconnecting")

    def http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.http_url, headers=self._headers, timeout=self.open_timeout
            )
        return self._http

    # ----------------------------------------------------------- reconnect loop
    async def _run(self) -> None:
        while not self.closing.is_set():
            now = self.clock()
            if not self.breaker.allow(now):
                await self.sleep(self.breaker.retry_in(now))
                continue
            delay = 0.0
            try:
                if self.http_fallback and self.refused_upgrades >= self.fallback_after:
                    await run_http(self)
                else:
                    delay = await self._run_ws()
            except asyncio.CancelledError:
                raise
            except _UpgradeRefused as exc:
                self.refused_upgrades += 1
                self.breaker.record_failure(self.clock())
                log.warning(
                    "WebSocket upgrade refused (%s), %d time(s)%s",
                    exc,
                    self.refused_upgrades,
                    "; falling back to HTTP"
                    if self.http_fallback and self.refused_upgrades >= self.fallback_after
                    else "",
                )
            except (OSError, TimeoutError, InvalidHandshake, httpx.HTTPError) as exc:
                self.breaker.record_failure(self.clock())
                log.info("cannot reach %s: %s", self.http_url, exc or type(exc).__name__)
            except TetherError as exc:
                self.breaker.record_failure(self.clock())
                log.warning("sync failed: %s", exc.message)
            except Exception:  # the shell must survive anything and retry
                self.breaker.record_failure(self.clock())
                log.exception("unexpected failure in the sync loop; retrying")
            finally:
                self._disconnected()
            if self.closing.is_set():
                break
            wait = max(delay, self.backoff.next_delay())
            log.info("reconnecting in %.2f s", wait)
            await self.sleep(wait)

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    def _disconnected(self) -> None:
        was = self.transport
        self.transport = None
        self._ws = None
        self.session.connection_lost()
        if was is not None:
            self.handler.state_changed()

    def mark_connected(self) -> None:
        self.backoff.reset()
        self.breaker.record_success()
        self.handler.state_changed()

    # ---------------------------------------------------------------- WebSocket
    async def _run_ws(self) -> float:
        """One WebSocket connection; returns the minimum delay before the next."""
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=self.open_timeout,
                ping_interval=self.stall_timeout / 2,
                ping_timeout=self.stall_timeout / 2,
                close_timeout=2,
                max_size=16 * MAX_FRAME_BYTES,
                compression=None,
                proxy=None,
            )
        except InvalidStatus as exc:
            # An HTTP answer other than 101: the upgrade itself is refused (a proxy
            # that does not pass WebSockets). Even 401/403 count here: the server
            # refuses tokens *after* accepting (close 4401), so an HTTP-level refusal
            # comes from something in between; the HTTP fallback then meets the real
            # server and its verdict on the token.
            raise _UpgradeRefused(f"HTTP {exc.response.status_code}") from exc
        self.refused_upgrades = 0
        self.connects += 1
        self._ws = ws
        self.transport = "websocket"
        sender = asyncio.create_task(self._sender(ws))
        try:
            self.session.connection_made()
            self.pump()
            return await self._read(ws)
        finally:
            await cancel_and_wait(sender, expected=(ConnectionClosed,))
            with contextlib.suppress(Exception):
                await ws.close()

    async def _read(self, ws: ClientConnection) -> float:
        was_synced = False
        while True:
            timeout = self.stall_timeout if self._owed() else None
            try:
                frame = await asyncio.wait_for(ws.recv(), timeout)
            except TimeoutError:
                log.warning(
                    "stalled: no frame from %s for %.1f s while %s; reconnecting",
                    self.url,
                    self.stall_timeout,
                    self._owed(),
                )
                await ws.close(1000, "stalled")
                return 0.0
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if not was_synced and code not in (4401, 4403, 4409):
                    self.breaker.record_failure(self.clock())
                disposition = self.session.receive_close(code, reason)
                self.pump()
                if disposition.retry:
                    log.info(
                        "connection closed (%s %s)%s",
                        code,
                        reason,
                        f": {disposition.error.message}" if disposition.error else "",
                    )
                return disposition.min_delay
            try:
                message = decode_server_message(frame)  # type: ignore[arg-type]
            except ProtocolError as exc:
                log.warning("server sent a bad frame (%s); reconnecting", exc.message)
                await ws.close(exc.close_code, exc.message[:120])
                return 0.0
            self.session.receive_message(message)
            if not was_synced and self.session.synced:
                was_synced = True
                log.info(
                    "connected to %s (server %s, head %d, cursor %d, %d pending)",
                    self.url,
                    self.session.server_id,
                    self.session.head,
                    self.session.cursor,
                    self.session.pending_count,
                )
                self.mark_connected()
            self.pump()

    def _owed(self) -> str:
        """What the server owes us, if anything (stall detection)."""
        s = self.session
        if s.expecting_reply:
            return "awaiting Welcome" if not s.synced else "awaiting PushResult"
        if s.state == "catching_up" and s.cursor == s.received_cursor and self.idle:
            return "awaiting the next page"
        return ""

    async def _sender(self, ws: ClientConnection) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            for message in self.session.messages_to_send():
                try:
                    await ws.send(encode(message))
                except ConnectionClosed:
                    return  # the reader sees the close and decides what next
