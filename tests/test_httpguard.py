"""Half-open connections are cut (issue 11, finding 6), on a real uvicorn and real sockets.

2,000 loopback connections send a partial request line and never finish it (the
"slowloris" attack). The instance must stay serviceable (a normal request and a
WebSocket session succeed while they hang) and close every one of them within the
header deadline; a slow but complete request, and a kept-alive connection that sends its
next request after a pause, are not cut.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from sync_server import create_app
from sync_server.httpguard import (
    DEFAULT_HEADER_TIMEOUT,
    HeaderDeadlineProtocol,
    header_deadline_protocol,
    raise_fd_limit,
)
from tests.conftest import scaled
from tests.servers import SECRET
from tests.sync_helpers import NOOP, RawClient, submit

pytestmark = pytest.mark.timeout(120)

HALF_OPEN = 2000
DEADLINE = 1.0


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"the file-descriptor hard limit {hard} is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Guarded:
    """uvicorn on a loopback port with the header-deadline protocol."""

    def __init__(self, app, http: type[HeaderDeadlineProtocol] | str) -> None:
        self.app = app
        self.http = http
        self.port = 0

    async def __aenter__(self) -> Guarded:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=self.http,
            ws="websockets-sansio",
            log_level="warning",
            lifespan="on",
            backlog=4096,
        )
        config.setup_event_loop = lambda: None  # type: ignore[method-assign]
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Guarded]:
    app = create_app(
        f"sqlite:///{tmp_path / 'sync.db'}", workflows=[NOOP], auth_secret=SECRET, run_sagas=False
    )
    async with Guarded(app, header_deadline_protocol(DEADLINE)) as server:
        yield server


async def _half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: tether\r\nX-Slow: ")
    await writer.drain()
    return reader, writer, opened


async def _closed_after(reader: asyncio.StreamReader, opened: float) -> tuple[float, bytes]:
    """Seconds from ``opened`` until the server closes, and what it sent."""
    data = await reader.read()  # until EOF
    return time.monotonic() - opened, data


async def test_two_thousand_half_open_connections_are_cut_and_the_instance_serves(guarded):
    _raise_fd_limit(3 * HALF_OPEN + 1000)  # both ends live in this process
    opened = time.monotonic()
    peers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    try:
        await _slowloris(guarded, peers, opened)
    finally:
        for _, writer, _ in peers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w, _ in peers), return_exceptions=True)


async def _slowloris(guarded, peers, opened):
    port = guarded.port
    for start in range(0, HALF_OPEN, 200):  # in waves: the accept loop keeps up
        peers += await asyncio.gather(*(_half_open(port) for _ in range(start, start + 200)))
    all_open = time.monotonic() - opened
    closing = [asyncio.create_task(_closed_after(reader, at)) for reader, _, at in peers]
    # While they hang, the instance serves HTTP and WebSocket clients normally.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        began = time.monotonic()
        r = await http.get("/healthz")
        served_in = time.monotonic() - began
    assert r.status_code == 200 and served_in < scaled(DEADLINE)
    client = await RawClient.open(f"ws://127.0.0.1:{port}")
    assert client.welcome is not None
    results = await asyncio.wait_for(asyncio.gather(*closing), scaled(30))
    # Every half-open connection was cut, with a 408, within the deadline (+ slack).
    ages = sorted(age for age, _ in results)
    assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in results)
    assert ages[0] >= DEADLINE * 0.9
    assert ages[-1] < DEADLINE + scaled(3.0), ages[-1]
    assert guarded.server.config.http_protocol_class.cut >= HALF_OPEN
    # The WebSocket session outlived the deadline: an upgraded connection is not cut.
    pushed = await client.push([submit(1)])
    assert [r.status for r in pushed.results] == ["applied"]
    await client.close()
    print(
        f"\n{HALF_OPEN} half-open connections opened in {all_open:.2f} s; cut after "
        f"median {statistics.median(ages):.2f} s, max {ages[-1]:.2f} s "
        f"(deadline {DEADLINE} s); /healthz answered in {served_in * 1000:.1f} ms"
    )


async def test_slow_but_complete_headers_and_kept_alive_connections_are_served(guarded):
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    # Headers in three pieces, all within the deadline: served.
    for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: tether\r\n", b"\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(DEADLINE / 4)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
    assert head.startswith(b"HTTP/1.1 200 ")
    body = await reader.readexactly(int(_header(head, b"content-length")))
    assert b"ok" in body
    # The same connection, kept alive, sends its next request after a pause longer
    # than the deadline (but within uvicorn's keep-alive timeout): served too.
    await asyncio.sleep(DEADLINE * 1.5)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: tether\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(5))
    assert head.startswith(b"HTTP/1.1 200 ")
    await reader.readexactly(int(_header(head, b"content-length")))
    # A next request that starts but never finishes is cut like the first would be.
    began = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")
    await writer.drain()
    rest = await asyncio.wait_for(reader.read(), scaled(10))
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert DEADLINE * 0.9 <= time.monotonic() - began < DEADLINE + scaled(2)
    writer.close()


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name!r} header in {head!r}")


def test_raise_fd_limit_lifts_the_soft_limit_up_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
        wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert raise_fd_limit(4096) == wanted
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == wanted
        assert raise_fd_limit(100) == wanted  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_deadline_must_be_positive_and_defaults_to_ten_seconds():
    assert DEFAULT_HEADER_TIMEOUT == 10.0 == HeaderDeadlineProtocol.header_timeout
    assert header_deadline_protocol(2.5).header_timeout == 2.5
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            header_deadline_protocol(bad)
