"""The fault proxy's connections: a ``Link`` per client and its two ``_Pipe`` objects.

``tests/faultproxy.py`` describes the theory of operation. Each pipe reads its side
(framing messages in WebSocket mode), queues chunks with a release time and writes them
out honouring the proxy's current faults (``tests/faultproxy_kinds.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from tests.faultproxy_kinds import Direction, WsAction, _Faults, _Frame, _parse_frame

if TYPE_CHECKING:
    from tests.faultproxy import FaultProxy

_CHUNK = 64 * 1024
_QUEUE_BUDGET = 4 * 1024 * 1024  # bytes a pipe holds before it stops reading (backpressure)
_MAX_HANDSHAKE = 64 * 1024
_EOF = object()


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with an RST (SO_LINGER 0), dropping anything unsent."""
    if writer is None or writer.transport.is_closing():
        return
    _set_linger_zero(writer)
    writer.transport.abort()


class _Pipe:
    """One direction of one link: read, fault, queue, release, write."""

    def __init__(
        self,
        link: Link,
        direction: Direction,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter | None,
    ) -> None:
        self.link = link
        self.proxy = link.proxy
        self.direction = direction
        self.src = src
        self.dst = dst
        self.queue: deque[tuple[float, Any]] = deque()
        self.queued_bytes = 0
        self.ready = asyncio.Event()  # something was queued
        self.room = asyncio.Event()  # the queue is under budget
        self.room.set()
        self.last_release = 0.0
        # WebSocket mode
        self.ws = self.proxy.websocket
        self.handshake: bytearray | None = bytearray() if self.ws else None
        self.frames = bytearray()
        self.message: list[_Frame] = []
        self.held: list[bytes] | None = None
        self.held_timer: asyncio.TimerHandle | None = None

    @property
    def faults(self) -> _Faults:
        return self.proxy._faults[self.direction]

    # ------------------------------------------------------------ reading
    async def read_loop(self) -> None:
        try:
            while True:
                await self.room.wait()
                try:
                    data = await self.src.read(_CHUNK)
                except (ConnectionError, OSError):
                    # A reset is passed on as a reset, unless a partition swallows it.
                    if self.link.blackholed or self.faults.partitioned:
                        self.link.damaged = True
                    else:
                        self.link.close(reset=True)
                    return
                if not data:
                    self._flush_held()
                    self._enqueue(_EOF)
                    return
                self.proxy.counters[f"bytes_{self.direction.value}"] += len(data)
                if self.link.blackholed or self.faults.partitioned:
                    self._discard(len(data))
                    continue
                if self.handshake is not None:
                    self._take_handshake(data)
                elif self.ws and self.link.ws_open:
                    self._take_frames(data)
                else:
                    self._enqueue(data)
        finally:
            self._cancel_held_timer()

    def _discard(self, size: int) -> None:
        self.proxy.counters["partition_dropped_bytes"] += size
        self.link.damaged = True

    def _enqueue(self, item: Any) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        faults = self.faults
        delay = faults.latency
        if faults.jitter:
            delay += self.proxy.rng.uniform(-faults.jitter, faults.jitter)
        release = max(now + max(delay, 0.0), self.last_release)
        if release > now:
            self.proxy.counters["latency_delayed"] += 1
        self.last_release = release
        self.queue.append((release, item))
        if isinstance(item, bytes):
            self.queued_bytes += len(item)
            if self.queued_bytes >= _QUEUE_BUDGET:
                self.room.clear()
        self.ready.set()

    # ---------------------------------------------------- websocket parsing
    def _take_handshake(self, data: bytes) -> None:
        assert self.handshake is not None
        self.handshake += data
        end = self.handshake.find(b"\r\n\r\n")
        if end < 0:
            if len(self.handshake) > _MAX_HANDSHAKE:  # not HTTP we understand: pass raw
                self._enqueue(bytes(self.handshake))
                self.handshake = None
            return
        head, rest = bytes(self.handshake[: end + 4]), bytes(self.handshake[end + 4 :])
        self.handshake = None
        if self.direction is Direction.UP:
            lines = head.split(b"\r\n")
            kept = [line for line in lines if not line.lower().startswith(b"sec-websocket-ext")]
            if len(kept) != len(lines):
                self.proxy.counters["ws_extensions_stripped"] += 1
            head = b"\r\n".join(kept)
            self._enqueue(head)
            # The server answers the upgrade before any frame: keep bytes raw until then.
            if rest:
                self._enqueue(rest)
            return
        self._enqueue(head)
        if head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
            self.link.ws_open = True
            if rest:
                self._take_frames(rest)
        elif rest:
            self._enqueue(rest)

    def _take_frames(self, data: bytes) -> None:
        self.frames += data
        while (frame := _parse_frame(self.frames)) is not None:
            if frame.control:
                self.proxy.counters["ws_control_frames"] += 1
                if frame.opcode == 0x8:  # close: nothing may be left behind it
                    self._flush_held()
                self._enqueue(frame.raw)
                continue
            self.message.append(frame)
            if frame.fin:
                message, self.message = self.message, []
                self._on_message(message)

    def _on_message(self, frames: list[_Frame]) -> None:
        counters = self.proxy.counters
        counters[f"ws_messages_{self.direction.value}"] += 1
        raw = [frame.raw for frame in frames]
        rule = self.proxy._pick_rule(self.direction, frames)
        if rule is None:
            self._emit(raw)
        elif rule.action is WsAction.DROP:
            counters["ws_dropped"] += 1
        elif rule.action is WsAction.DUPLICATE:
            counters["ws_duplicated"] += 1
            self._emit(raw)
            self._emit(raw)
        elif self.held is not None:  # already holding one: hold this one in place
            self._emit(raw)
        else:
            self.held = raw
            loop = asyncio.get_running_loop()
            self.held_timer = loop.call_later(self.proxy.reorder_hold, self._expire_held)

    def _emit(self, raw: list[bytes]) -> None:
        for piece in raw:
            self._enqueue(piece)
        if self.held is not None:
            held, self.held = self.held, None
            self._cancel_held_timer()
            self.proxy.counters["ws_reordered"] += 1
            for piece in held:
                self._enqueue(piece)

    def _expire_held(self) -> None:
        self.held_timer = None
        self._flush_held()

    def _flush_held(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self._cancel_held_timer()
            self.proxy.counters["ws_reorder_expired"] += 1
            for piece in held:
                self._enqueue(piece)

    def _cancel_held_timer(self) -> None:
        if self.held_timer is not None:
            self.held_timer.cancel()
            self.held_timer = None

    # ------------------------------------------------------------ writing
    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            release, item = self.queue[0]
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the latency fault itself
            faults = self.faults
            if not faults.flowing.is_set():
                self.proxy.counters["stall_held"] += 1
                await faults.flowing.wait()
            self.queue.popleft()
            if isinstance(item, bytes):
                self.queued_bytes -= len(item)
                if self.queued_bytes < _QUEUE_BUDGET:
                    self.room.set()
            faults = self.faults
            if self.link.blackholed or faults.partitioned:
                if item is not _EOF:
                    self._discard(len(item))
                else:
                    self.link.damaged = True
                continue
            if self.dst is None:
                continue
            if item is _EOF:
                with contextlib.suppress(OSError, RuntimeError):
                    if self.dst.can_write_eof():
                        self.dst.write_eof()
                self.link.pipe_done(self)
                return
            try:
                await self._write(item, faults)
            except (ConnectionError, OSError):
                self.link.close(reset=True)
                return

    async def _write(self, data: bytes, faults: _Faults) -> None:
        assert self.dst is not None
        rate = faults.bandwidth
        if not rate:
            self.dst.write(data)
            await self.dst.drain()
            return
        slice_size = max(1, int(rate / 20))
        for start in range(0, len(data), slice_size):
            piece = data[start : start + slice_size]
            self.dst.write(piece)
            await self.dst.drain()
            self.proxy.counters["throttled_bytes"] += len(piece)
            await asyncio.sleep(len(piece) / rate)  # the throttle itself


class Link:
    """One proxied connection: the client side, the upstream side and two pipes."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.server_writer: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.damaged = False
        self.ws_open = False
        self.up: _Pipe
        self.down: _Pipe
        self._tasks: list[asyncio.Task[None]] = []
        self._done_pipes = 0
        self.closed = asyncio.Event()

    async def run(self, target: tuple[str, int], connect_timeout: float) -> None:
        proxy = self.proxy
        if proxy._faults[Direction.UP].partitioned:
            # The SYN is lost in the partition: the client talks into a black hole.
            self.blackholed = True
            proxy.counters["blackholed_connections"] += 1
            server_reader = asyncio.StreamReader()
            server_reader.feed_eof()
        else:
            try:
                async with asyncio.timeout(connect_timeout):
                    server_reader, self.server_writer = await asyncio.open_connection(*target)
            except (OSError, TimeoutError):
                proxy.counters["upstream_failures"] += 1
                _abort(self.client_writer)
                self.closed.set()
                return
        self.up = _Pipe(self, Direction.UP, self.client_reader, self.server_writer)
        self.down = _Pipe(self, Direction.DOWN, server_reader, self.client_writer)
        for pipe in (self.up, self.down):
            self._tasks.append(asyncio.create_task(pipe.read_loop()))
            if not (self.blackholed and pipe is self.down):
                self._tasks.append(asyncio.create_task(pipe.write_loop()))
        try:
            await self.closed.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def pipe_done(self, pipe: _Pipe) -> None:
        """A pipe forwarded its EOF; when both did, the link is over."""
        self._done_pipes += 1
        if self._done_pipes >= 2:
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        """End the link on both sides, with an RST or a FIN."""
        if self.closed.is_set():
            return
        for writer in (self.client_writer, self.server_writer):
            if writer is None:
                continue
            if reset:
                _abort(writer)
            else:
                with contextlib.suppress(Exception):
                    writer.close()
        self.closed.set()

    def half_open(self, keep: str) -> None:
        """Reset one side and leave the other open, silent and discarding."""
        cut = self.server_writer if keep == "client" else self.client_writer
        _abort(cut)
        self.blackholed = True
