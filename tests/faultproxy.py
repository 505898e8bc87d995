"""An asyncio TCP fault proxy for tests, controllable while traffic flows.

Theory of operation
-------------------
``FaultProxy`` listens on 127.0.0.1 and opens one upstream connection per accepted
client (a *link*). Each link has two *pipes*: ``up`` (client → server) and ``down``
(server → client). A pipe's reader reads chunks, applies the message-level faults (in
WebSocket mode) and queues them with a release time; its writer waits for the release
time, honours stalls, partitions and bandwidth, and writes. Faults are plain state on
the proxy, read by every pipe at every chunk, so a test changes them at any moment
(``set_latency``, ``partition``, ``stall``…) and the change applies to traffic already
flowing. Nothing here sleeps to synchronise: waits are the faults themselves (latency,
throttling) and every wait is bounded by the fault being lifted or the proxy stopping.

Stream faults (any TCP protocol)
    * latency and jitter per direction (seeded RNG; a TCP stream is never reordered:
      a chunk is released no earlier than the one before it);
    * bandwidth throttling per direction (bytes per second, per link);
    * ``partition(direction)``: a black hole — bytes (and FIN) in that direction are
      read and discarded, the connection stays open. A link that lost bytes is
      *damaged*; ``heal()`` resets the damaged links, as TCP aborts a connection whose
      retransmissions went unanswered, so nothing ever sees a corrupted stream.
      Connections accepted during a partition are black-holed whole;
    * ``stall(direction)``: stop forwarding without closing; the bytes are held and
      delivered intact on ``resume()`` (a short outage, TCP retransmitting);
    * ``half_open(keep=...)``: cut one side (RST) and leave the other open but silent
      forever — the peer learns only from its own keepalive/ping timeout;
    * ``reset_all()`` (RST both sides), ``close_all()`` (FIN both sides);
    * ``set_refusing(True)``: new connections are reset at once (counted), or with
      ``mode="closed"`` the listener is closed so connects get ECONNREFUSED.

WebSocket faults (``websocket=True``)
    The HTTP upgrade passes untouched except that ``Sec-WebSocket-Extensions`` is
    removed from the request, so no compression is negotiated and frames can be
    replayed safely. After a ``101`` answer each pipe parses RFC 6455 frames (client
    frames are masked, §5.3). Whole data messages (a text/binary frame and its
    continuations, §5.4) can be dropped, duplicated or reordered by ``WsRule`` s;
    control frames (close, ping, pong, §5.5) always pass intact and in order. A
    reordered message is held back and released right after the next data message in
    the same direction (they swap); if none comes within ``reorder_hold`` seconds, or
    a close frame comes first, it is released in place and counted as
    ``ws_reorder_expired`` rather than ``ws_reordered``.

Counters
    ``proxy.counters`` counts every fault actually applied (``latency_delayed``,
    ``throttled_bytes``, ``partition_dropped_bytes``, ``partition_resets``,
    ``stall_held``, ``half_open``, ``resets``, ``closes``, ``refused``, ``ws_dropped``,
    ``ws_duplicated``, ``ws_reordered``…) plus traffic (``connections``, ``bytes_up``,
    ``bytes_down``, ``ws_messages_up``…), so a test can assert that a fault really
    happened ("sometimes" assertions) instead of passing vacuously.

``BackgroundProxy`` runs a ``FaultProxy`` on its own event loop in a thread, for
drivers that are synchronous or live in another loop (the chaos scenario).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "BackgroundProxy",
    "Direction",
    "FaultProxy",
    "Link",
    "WsAction",
    "WsRule",
]

_CHUNK = 64 * 1024
_QUEUE_BUDGET = 4 * 1024 * 1024  # bytes a pipe holds before it stops reading (backpressure)
_MAX_HANDSHAKE = 64 * 1024
_EOF = object()


class Direction(StrEnum):
    """Which way traffic flows: ``up`` is client → server, ``down`` server → client."""

    UP = "up"
    DOWN = "down"
    BOTH = "both"

    def covers(self, pipe: Direction) -> bool:
        """Whether a fault set for ``self`` applies to the ``pipe`` direction."""
        return self is Direction.BOTH or self is pipe


class WsAction(StrEnum):
    """What a ``WsRule`` does to a whole WebSocket data message."""

    DROP = "drop"
    DUPLICATE = "duplicate"
    REORDER = "reorder"


@dataclass
class WsRule:
    """A message-level fault.

    Attributes:
        action: drop, duplicate or reorder.
        direction: which pipe(s) it watches.
        probability: chance (seeded RNG) that it fires on a matching message.
        count: fire at most this many times (None: unlimited).
        match: optional predicate on the unmasked payload of the whole message.
        fired: how many times it fired.
    """

    action: WsAction
    direction: Direction = Direction.BOTH
    probability: float = 1.0
    count: int | None = None
    match: Callable[[bytes], bool] | None = None
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        """True once it fired ``count`` times."""
        return self.count is not None and self.fired >= self.count


@dataclass
class _Faults:
    """The fault settings of one direction."""

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None  # bytes per second per link
    partitioned: bool = False
    stalled: bool = False
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()


@dataclass
class _Frame:
    """One parsed RFC 6455 frame (the raw bytes are forwarded unchanged)."""

    fin: bool
    opcode: int
    raw: bytes
    payload_offset: int
    mask: bytes | None

    @property
    def control(self) -> bool:
        return self.opcode >= 0x8

    def payload(self) -> bytes:
        data = self.raw[self.payload_offset :]
        if self.mask is None or not data:
            return data
        key = (self.mask * (len(data) // 4 + 1))[: len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def _parse_frame(buffer: bytearray) -> _Frame | None:
    """Take one complete frame off the front of ``buffer`` (RFC 6455 §5.2), or None."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    length = second & 0x7F
    offset = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, 2)
        offset = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, 2)
        offset = 10
    mask = None
    if second & 0x80:
        if len(buffer) < offset + 4:
            return None
        mask = bytes(buffer[offset : offset + 4])
        offset += 4
    end = offset + length
    if len(buffer) < end:
        return None
    raw = bytes(buffer[:end])
    del buffer[:end]
    return _Frame(bool(first & 0x80), first & 0x0F, raw, offset, mask)


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


class FaultProxy:
    """A loopback TCP proxy with injectable faults (see the module docstring).

    Args:
        target: (host, port) of the real server.
        seed: seeds the RNG of jitter and probabilistic message faults.
        websocket: parse RFC 6455 frames after an upgrade (message-level faults).
        port: port to listen on (0: any free port; kept across ``set_refusing``).
        connect_timeout: bound on each upstream connect.
        reorder_hold: longest a reordered message waits for a successor (seconds).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        seed: int = 0,
        websocket: bool = False,
        port: int = 0,
        connect_timeout: float = 5.0,
        reorder_hold: float = 0.5,
    ) -> None:
        self.target = target
        self.seed = seed
        self.rng = random.Random(seed)
        self.websocket = websocket
        self.port = port
        self.host = "127.0.0.1"
        self.connect_timeout = connect_timeout
        self.reorder_hold = reorder_hold
        self.counters: Counter[str] = Counter()
        self.links: set[Link] = set()
        self.ws_rules: list[WsRule] = []
        self._faults = {Direction.UP: _Faults(), Direction.DOWN: _Faults()}
        self._server: asyncio.Server | None = None
        self._refusing = False
        self._numbers = itertools.count(1)
        self._link_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients should connect to."""
        return self.host, self.port

    def url(self, scheme: str = "http") -> str:
        """``scheme://127.0.0.1:port`` of the proxy."""
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        """Start listening; returns self."""
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and reset every link; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self.links):
            link.close(reset=True)
        for faults in self._faults.values():
            faults.flowing.set()
        if self._link_tasks:
            await asyncio.wait(list(self._link_tasks), timeout=5)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.counters["refused"] += 1
            _abort(writer)
            return
        self.counters["connections"] += 1
        link = Link(self, next(self._numbers), reader, writer)
        self.links.add(link)
        task = asyncio.current_task()
        if task is not None:
            self._link_tasks.add(task)
        try:
            await link.run(self.target, self.connect_timeout)
        finally:
            self.links.discard(link)
            if task is not None:
                self._link_tasks.discard(task)

    # -------------------------------------------------------- stream faults
    def _directions(self, direction: Direction | str) -> list[Direction]:
        chosen = Direction(direction)
        return [d for d in (Direction.UP, Direction.DOWN) if chosen.covers(d)]

    def set_latency(
        self, latency: float, jitter: float = 0.0, direction: Direction | str = Direction.BOTH
    ) -> None:
        """Delay every chunk by ``latency`` ± ``jitter`` seconds (order kept)."""
        for d in self._directions(direction):
            self._faults[d].latency = latency
            self._faults[d].jitter = jitter

    def set_bandwidth(
        self, bytes_per_second: float | None, direction: Direction | str = Direction.BOTH
    ) -> None:
        """Throttle each link to ``bytes_per_second`` (None: unlimited)."""
        for d in self._directions(direction):
            self._faults[d].bandwidth = bytes_per_second

    def partition(self, direction: Direction | str = Direction.BOTH) -> None:
        """Black-hole traffic in ``direction`` until ``heal()``."""
        for d in self._directions(direction):
            self._faults[d].partitioned = True
        self.counters["partitions"] += 1

    def heal(self) -> int:
        """End every partition; reset the links that lost bytes. Returns how many."""
        for faults in self._faults.values():
            faults.partitioned = False
        damaged = [link for link in self.links if link.damaged or link.blackholed]
        for link in damaged:
            link.close(reset=True)
        self.counters["partition_resets"] += len(damaged)
        return len(damaged)

    def stall(self, direction: Direction | str = Direction.BOTH) -> None:
        """Stop forwarding in ``direction`` without closing; bytes are held."""
        for d in self._directions(direction):
            self._faults[d].stalled = True
            self._faults[d].flowing.clear()
        self.counters["stalls"] += 1

    def resume(self, direction: Direction | str = Direction.BOTH) -> None:
        """Deliver what a stall held and keep forwarding."""
        for d in self._directions(direction):
            self._faults[d].stalled = False
            self._faults[d].flowing.set()

    def reset_all(self) -> int:
        """Reset (RST) every open link on both sides. Returns how many."""
        links = list(self.links)
        for link in links:
            link.close(reset=True)
        self.counters["resets"] += len(links)
        return len(links)

    def close_all(self) -> int:
        """Close (FIN) every open link on both sides. Returns how many."""
        links = list(self.links)
        for link in links:
            link.close(reset=False)
        self.counters["closes"] += len(links)
        return len(links)

    def half_open(self, keep: str = "client") -> int:
        """Cut one side of every link and leave the other open and silent.

        Args:
            keep: ``"client"`` leaves the client's socket open (the server sees a reset);
                ``"server"`` leaves the server's socket open (the client sees a reset).

        Returns:
            How many links were left half-open.
        """
        if keep not in ("client", "server"):
            raise ValueError("keep must be 'client' or 'server'")
        links = [link for link in self.links if not link.blackholed]
        for link in links:
            link.half_open(keep)
        self.counters["half_open"] += len(links)
        return len(links)

    async def set_refusing(self, refusing: bool = True, *, mode: str = "reset") -> None:
        """Refuse new connections (existing links are untouched).

        Args:
            refusing: start or stop refusing.
            mode: ``"reset"`` accepts and resets at once (counted as ``refused``);
                ``"closed"`` closes the listener (connects get ECONNREFUSED).
        """
        if mode not in ("reset", "closed"):
            raise ValueError("mode must be 'reset' or 'closed'")
        self._refusing = refusing and mode == "reset"
        if refusing and mode == "closed" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            self.counters["listener_closed"] += 1
        elif not refusing and self._server is None:
            await self._listen()

    # ----------------------------------------------------- message faults
    def add_ws_rule(
        self,
        action: WsAction | str,
        direction: Direction | str = Direction.BOTH,
        *,
        probability: float = 1.0,
        count: int | None = None,
        match: Callable[[bytes], bool] | None = None,
    ) -> WsRule:
        """Add a WebSocket message fault (needs ``websocket=True``); returns the rule."""
        if not self.websocket:
            raise ValueError("message-level faults need FaultProxy(..., websocket=True)")
        rule = WsRule(WsAction(action), Direction(direction), probability, count, match)
        self.ws_rules.append(rule)
        return rule

    def clear_ws_rules(self) -> None:
        """Remove every message fault."""
        self.ws_rules.clear()

    def _pick_rule(self, direction: Direction, frames: list[_Frame]) -> WsRule | None:
        payload: bytes | None = None
        for rule in self.ws_rules:
            if rule.exhausted or not rule.direction.covers(direction):
                continue
            if rule.match is not None:
                if payload is None:
                    payload = b"".join(frame.payload() for frame in frames)
                if not rule.match(payload):
                    continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            rule.fired += 1
            return rule
        return None

    def clear(self) -> None:
        """Lift every fault: heal (resetting damaged links), resume, no latency/throttle/rules.

        Refusal is lifted by ``await set_refusing(False)``.
        """
        self.heal()
        self.resume()
        self.set_latency(0.0)
        self.set_bandwidth(None)
        self.clear_ws_rules()


class BackgroundProxy:
    """A ``FaultProxy`` on its own event loop in a daemon thread.

    Every control method of ``FaultProxy`` is available through ``call(name, ...)`` and
    runs on the proxy's loop; coroutine methods are awaited there. Use it as a context
    manager from synchronous code.

    Args:
        target: (host, port) of the real server.
        **options: ``FaultProxy`` keyword arguments.
    """

    def __init__(self, target: tuple[str, int], **options: Any) -> None:
        self._target = target
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.proxy: FaultProxy | None = None

    def start(self, timeout: float = 10.0) -> BackgroundProxy:
        """Start the thread and the proxy."""
        self._thread.start()

        async def make() -> FaultProxy:
            return await FaultProxy(self._target, **self._options).start()

        self.proxy = asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)
        return self

    @property
    def port(self) -> int:
        """The proxy's listening port."""
        assert self.proxy is not None
        return self.proxy.port

    def call(self, name: str, *args: Any, timeout: float = 10.0, **kwargs: Any) -> Any:
        """Run ``proxy.<name>(*args, **kwargs)`` on the proxy's loop and return its result."""
        assert self.proxy is not None
        method = getattr(self.proxy, name)

        async def run() -> Any:
            result = method(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def counters(self) -> dict[str, int]:
        """A copy of the proxy's fault counters."""
        assert self.proxy is not None
        proxy = self.proxy

        async def copy() -> dict[str, int]:
            return dict(proxy.counters)

        return asyncio.run_coroutine_threadsafe(copy(), self._loop).result(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the proxy, the loop and the thread."""
        if self.proxy is not None:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BackgroundProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
