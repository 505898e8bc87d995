"""One reconnecting WebSocket to emp-job-queue's client endpoint (``/ws/client/{id}``).

The queue sends a job's events only to the connection that submitted it, at most once
and never again after a reconnect or an API restart, and acknowledges nothing. So this
shell keeps exactly one connection per adapter instance, reconnects with jittered
backoff whenever it drops, hands every decoded message to ``on_message``, and lets
senders wait (bounded) for a connection. It never decides anything about jobs: losses
are covered by the adapter's status polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = ["EmpSocket", "SocketUnavailable"]

log = logging.getLogger("tether.adapters.emp")

MAX_MESSAGE = 1 << 20
"""Largest message accepted from the queue (bytes); a completion carries the result."""


class SocketUnavailable(ConnectionError):
    """No connection to the queue within the time allowed, or the token was refused."""


class EmpSocket:
    """The adapter's connection to the queue.

    Args:
        ws_url: ``ws://host:port`` of the queue.
        client_id: this connection's client id (the path segment).
        auth_token: sent as ``?token=`` (the queue closes a bad one with 1008).
        on_message: called with every JSON object received.
        backoff: (first, most) seconds between reconnects.
    """

    def __init__(
        self,
        ws_url: str,
        client_id: str,
        auth_token: str | None,
        on_message: Callable[[dict[str, Any]], None],
        *,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        query = f"?token={quote(auth_token)}" if auth_token else ""
        self.uri = f"{ws_url}/ws/client/{quote(client_id)}{query}"
        self.on_message = on_message
        self.backoff = backoff
        self.connects = 0
        self.refused = False
        self._conn: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def start(self) -> None:
        """Start the connect loop (idempotent; needs a running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="emp-socket")

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.warning("emp-job-queue connection loop failed: %s", task.exception())
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """True while a connection to the queue is open."""
        return self._connected.is_set()

    async def send(self, message: dict[str, Any], timeout: float) -> None:
        """Send one message, waiting up to ``timeout`` s for a connection.

        Raises:
            SocketUnavailable: no connection in time (or the token was refused).
        """
        self.start()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.refused:
                raise SocketUnavailable("the queue refused the auth token (close 1008)")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise SocketUnavailable("no connection to emp-job-queue")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), left)
            conn = self._conn
            if conn is None:
                continue
            try:
                await conn.send(json.dumps(message))
                return
            except ConnectionClosed:
                self._connected.clear()  # the loop reconnects; try again

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with connect(self.uri, max_size=MAX_MESSAGE, open_timeout=5) as conn:
                    self._conn = conn
                    self.connects += 1
                    failures = 0
                    self._connected.set()
                    async for raw in conn:
                        self._dispatch(raw)
                    if conn.close_code == 1008:
                        self.refused = True
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == 1008:
                    self.refused = True
            except (OSError, InvalidHandshake, InvalidStatus, TimeoutError) as exc:
                log.debug("emp-job-queue connection failed: %s", exc)
            finally:
                self._connected.clear()
                self._conn = None
            if self.refused:
                log.error("emp-job-queue refused the auth token (close 1008)")
                return
            failures += 1
            first, most = self.backoff
            await asyncio.sleep(self._rng.uniform(0, min(most, first * 2**failures)))

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            log.warning("emp-job-queue sent a message that is not JSON; ignored")
            return
        if isinstance(message, dict):
            try:
                self.on_message(message)
            except Exception:
                log.exception("emp-job-queue message handler failed")
