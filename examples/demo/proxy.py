"""A tiny loopback TCP relay that can take its clients offline (the demo's network cut).

``LinkProxy`` forwards every connection to the upstream port. ``go_offline()`` aborts
every relayed connection and refuses new ones at once (they are accepted and reset), as
a phone that lost its network would see; ``go_online()`` relays again. It is a relay,
not a fault injector: the test suite's ``tests/faultproxy.py`` does far more.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

__all__ = ["LinkProxy"]

_CHUNK = 64 * 1024


class LinkProxy:
    """Relays 127.0.0.1:<port> to 127.0.0.1:<upstream_port>.

    Args:
        upstream_port: where connections go.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.online = True
        self.port = 0
        self.refused = 0
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> LinkProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def go_offline(self) -> None:
        """Cut every relayed connection; refuse new ones until ``go_online``."""
        self.online = False
        self.cut += len(self._writers) // 2
        self._abort_all()

    def go_online(self) -> None:
        """Relay again."""
        self.online = True

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.online:
            self.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _abort(writer)
            return
        for w in (writer, up_writer):
            with contextlib.suppress(OSError):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                if not w.transport.is_closing():
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # A peer's orderly close is passed on in order: buffered bytes first (close,
            # not abort, so a WebSocket close frame is not thrown away).
            if not writer.transport.is_closing():
                writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a reset (no lingering half-open connection)."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
