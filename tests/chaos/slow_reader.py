"""A slow-reading sync client for the heavy chaos variant (issue 11).

It speaks the wire protocol by hand in its own thread and event loop: ``Hello`` from its
cursor, catch-up at full speed, then — once live — it stops reading for ``stall``
seconds at a time (one frame between stalls), through a 4 KiB receive buffer, straight
to an instance (no proxy buffers in between), so the server's send queue for it fills
up while heavy traffic flows. When the server cuts it
(1013, or its keepalive timing out: ``server_cuts`` counts both, told apart from an
instance's death) it reconnects from its cursor after a pause. ``finish(head)``
makes it read at full speed until its cursor reaches ``head``; ``seqs`` then must equal
its tenant's log (gapless, no duplicate) — a slow reader catches up like any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from protocol import PROTOCOL_VERSION, Ack, Events, Hello, decode_server_message, encode


class SlowReader:
    """One slow raw client; ``start()`` it, ``finish(head)`` it, then read its results."""

    def __init__(
        self,
        urls: list[str],
        token: str,
        name: str,
        stall: float = 2.0,
        generation: Callable[[str], int | None] = lambda url: None,
    ) -> None:
        self.generation = generation
        """The instance behind ``url``: a number that changes when it restarts, None
        while it is down (tells a server's cut from an instance's death)."""
        self.server_cuts = 0
        """Connections the server closed while its instance stayed up: 1013 from the
        send queue, or the keepalive timing the stalled reader out."""
        self.urls = urls
        self.token = token
        self.name = name
        self.stall = stall
        self.seqs: list[int] = []
        self.closes: Counter[int | None] = Counter()
        self.connects = 0
        self.error: str | None = None
        self._target: int | None = None
        self._done = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def cursor(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def start(self) -> SlowReader:
        self._thread.start()
        return self

    def finish(self, head: int) -> None:
        """Stop being slow; read until the cursor reaches ``head``."""
        self._target = head

    def wait(self, timeout: float) -> bool:
        """True once caught up to the ``finish`` head (or failed: see ``error``)."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(10)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # the harness reports it; the thread must not die silently
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    async def _run(self) -> None:
        while not self._stop:
            if self._target is not None and self.cursor >= self._target:
                return
            with contextlib.suppress(OSError, ConnectionClosed, TimeoutError, InvalidHandshake):
                await self._session()
            await asyncio.sleep(0.5)

    async def _session(self) -> None:
        # Straight to an instance, a different one each time: a proxy's own buffers
        # would absorb the backlog that the server's send queue must meet.
        url = self.urls[self.connects % len(self.urls)]
        parts = urlsplit(url)
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
            ws = await connect(
                f"{url}/v1/sync",
                sock=sock,
                max_queue=1,
                max_size=None,
                open_timeout=10,
                additional_headers={"Authorization": f"Bearer {self.token}"},
            )
        except BaseException:
            sock.close()  # the instance is down: try the next one
            self.connects += 1
            raise
        self.connects += 1
        generation = self.generation(url)
        hello = Hello(client_id=self.name, protocol_version=PROTOCOL_VERSION, cursor=self.cursor)
        live = False
        try:
            await ws.send(encode(hello))
            while not self._stop:
                if self._target is not None and self.cursor >= self._target:
                    return
                try:
                    frame = await asyncio.wait_for(ws.recv(), 10)
                except TimeoutError:
                    continue
                message = decode_server_message(frame)  # type: ignore[arg-type]
                if isinstance(message, Events):
                    for event in message.events:
                        if event.seq > self.cursor:
                            self.seqs.append(event.seq)
                    await ws.send(encode(Ack(cursor=self.cursor)))
                    live = live or not message.has_more
                if live and self._target is None:
                    # Stalled once live: catch-up pages are flow-controlled by our Acks,
                    # but live batches are pushed, and the server's queue for us fills
                    # up. Read nothing more until ``finish`` (or ``stall`` seconds).
                    stalled = 0.0
                    while self._target is None and not self._stop and stalled < self.stall:
                        await asyncio.sleep(0.2)
                        stalled += 0.2
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            self.closes[code] += 1
            if code == 1013 or (code is None and self.generation(url) == generation):
                self.server_cuts += 1
        finally:
            with contextlib.suppress(Exception):
                await ws.close()
