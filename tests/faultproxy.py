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

Layout: this module holds ``FaultProxy`` (the listener and the fault controls) and
``BackgroundProxy``; ``tests/faultproxy_link.py`` holds ``Link`` and its pipes, and
``tests/faultproxy_kinds.py`` the shared vocabulary (``Direction``, ``WsAction``,
``WsRule``, the fault state and the WebSocket frame parser). Import from here.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.faultproxy_kinds import Direction, WsAction, WsRule, _Faults, _Frame
from tests.faultproxy_link import Link, _abort

__all__ = [
    "BackgroundProxy",
    "Direction",
    "FaultProxy",
    "Link",
    "WsAction",
    "WsRule",
]


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
