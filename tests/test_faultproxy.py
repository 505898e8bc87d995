"""The fault proxy against a tiny TCP echo server and a real ``websockets`` echo server.

Every test asserts both the effect seen by the peers and the proxy's counter for the
fault, so a fault that silently did nothing fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import wait_for
from tests.faultproxy import BackgroundProxy, Direction, FaultProxy, WsAction

pytestmark = pytest.mark.timeout(30)


class EchoServer:
    """Echoes every byte; counts what it received."""

    def __init__(self) -> None:
        self.received = 0
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@contextlib.asynccontextmanager
async def echo_and_proxy(**options) -> AsyncIterator[tuple[EchoServer, FaultProxy]]:
    async with EchoServer() as echo, FaultProxy(("127.0.0.1", echo.port), **options) as proxy:
        yield echo, proxy


async def open_client(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.address)


async def roundtrip(reader, writer, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def test_passthrough_counts_bytes_both_ways():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        payload = bytes(range(256)) * 1000
        assert await roundtrip(reader, writer, payload) == payload
        assert proxy.counters["bytes_up"] == len(payload) == echo.received
        await wait_for(lambda: proxy.counters["bytes_down"] == len(payload))
        assert proxy.counters["connections"] == 1
        writer.close()
        await wait_for(lambda: echo.closed == 1 and not proxy.links)


async def test_latency_applies_per_direction_and_keeps_order():
    async with echo_and_proxy(seed=7) as (_, proxy):
        reader, writer = await open_client(proxy)
        proxy.set_latency(0.15, direction=Direction.UP)
        start = time.monotonic()
        chunks = [bytes([i]) * 100 for i in range(5)]
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        echoed = await reader.readexactly(500)
        assert time.monotonic() - start >= 0.15
        assert echoed == b"".join(chunks)
        assert proxy.counters["latency_delayed"] >= 1
        proxy.set_latency(0.0)
        writer.close()


async def test_jitter_is_seeded_and_never_reorders_a_stream():
    delays = []
    for _ in range(2):
        async with echo_and_proxy(seed=42) as (_, proxy):
            proxy.set_latency(0.02, jitter=0.02)
            reader, writer = await open_client(proxy)
            for i in range(10):
                assert await roundtrip(reader, writer, f"{i:04d}".encode()) == f"{i:04d}".encode()
            delays.append(proxy.rng.random())
            assert proxy.counters["latency_delayed"] >= 10
            writer.close()
    assert delays[0] == delays[1]  # same seed, same sequence of jitter draws


async def test_bandwidth_throttle():
    async with echo_and_proxy() as (_, proxy):
        proxy.set_bandwidth(100_000, direction=Direction.DOWN)
        reader, writer = await open_client(proxy)
        start = time.monotonic()
        payload = b"x" * 50_000
        assert await roundtrip(reader, writer, payload) == payload
        assert time.monotonic() - start >= 0.4  # 50 kB at 100 kB/s
        assert proxy.counters["throttled_bytes"] == 50_000
        writer.close()


async def test_partition_up_black_holes_then_heal_resets_damaged_links():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"before") == b"before"
        proxy.partition(Direction.UP)
        writer.write(b"lost in the partition")
        await writer.drain()
        await wait_for(lambda: proxy.counters["partition_dropped_bytes"] == 21)
        assert echo.received == len(b"before")  # dropped on read: it never went on
        # A new connection during the partition is black-holed whole.
        _reader2, writer2 = await open_client(proxy)
        writer2.write(b"hello?")
        await writer2.drain()
        await wait_for(lambda: proxy.counters["blackholed_connections"] == 1)
        await wait_for(lambda: proxy.counters["partition_dropped_bytes"] == 27)
        assert echo.connections == 1
        assert proxy.heal() == 2
        assert proxy.counters["partition_resets"] == 2
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        # After healing, new connections work again.
        reader3, writer3 = await open_client(proxy)
        assert await roundtrip(reader3, writer3, b"after") == b"after"
        for w in (writer, writer2, writer3):
            w.close()


async def test_partition_down_lets_the_server_hear_but_not_answer():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"ping") == b"ping"
        proxy.partition("down")
        writer.write(b"one-way")
        await writer.drain()
        await wait_for(lambda: echo.received == 4 + 7)
        await wait_for(lambda: proxy.counters["partition_dropped_bytes"] == 7)
        assert proxy.heal() == 1
        writer.close()


async def test_stall_holds_bytes_and_resume_delivers_them_intact():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"a") == b"a"
        proxy.stall(Direction.UP)
        writer.write(b"held")
        await writer.drain()
        await wait_for(lambda: proxy.counters["stall_held"] >= 1)
        assert echo.received == 1  # nothing went on while stalled, and nothing was closed
        assert proxy.links and not writer.is_closing()
        proxy.resume()
        assert await reader.readexactly(4) == b"held"
        assert proxy.counters["partition_dropped_bytes"] == 0
        writer.close()


async def test_control_while_traffic_flows():
    async with echo_and_proxy(seed=3) as (_, proxy):
        reader, writer = await open_client(proxy)
        received = bytearray()
        sent = bytearray()

        async def pump() -> None:
            for i in range(200):
                chunk = f"{i:05d}".encode() * 20
                sent.extend(chunk)
                writer.write(chunk)
                await writer.drain()
                received.extend(await reader.readexactly(len(chunk)))

        task = asyncio.create_task(pump())
        await wait_for(lambda: len(received) > 1000)
        proxy.set_latency(0.005, jitter=0.004)
        await wait_for(lambda: proxy.counters["latency_delayed"] > 10)
        proxy.stall()
        await wait_for(lambda: proxy.counters["stall_held"] >= 1)
        proxy.resume()
        proxy.set_bandwidth(2_000_000)
        await wait_for(lambda: proxy.counters["throttled_bytes"] > 0)
        proxy.clear()
        await asyncio.wait_for(task, 20)
        assert bytes(received) == bytes(sent)
        writer.close()


async def test_reset_all_sends_rst_to_both_sides():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"x") == b"x"
        assert proxy.reset_all() == 1
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        await wait_for(lambda: echo.closed == 1)
        assert proxy.counters["resets"] == 1
        writer.close()


async def test_close_all_sends_fin():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"x") == b"x"
        assert proxy.close_all() == 1
        assert await reader.read() == b""
        await wait_for(lambda: echo.closed == 1)
        writer.close()


async def test_half_open_keeps_the_client_socket_open_and_silent():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"x") == b"x"
        assert proxy.half_open(keep="client") == 1
        await wait_for(lambda: echo.closed == 1)  # the server saw the cut
        writer.write(b"anyone there?")
        await writer.drain()
        await wait_for(lambda: proxy.counters["partition_dropped_bytes"] == 13)
        assert not reader.at_eof() and not writer.is_closing()  # the client never hears
        assert proxy.counters["half_open"] == 1
        assert proxy.heal() == 1  # healing ends it with a reset
        writer.close()


async def test_half_open_keeps_the_server_socket_open():
    async with echo_and_proxy() as (echo, proxy):
        reader, writer = await open_client(proxy)
        assert await roundtrip(reader, writer, b"x") == b"x"
        assert proxy.half_open(keep="server") == 1
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        assert echo.closed == 0
        proxy.heal()
        await wait_for(lambda: echo.closed == 1)
        writer.close()


async def test_refuse_new_connections_in_both_modes():
    async with echo_and_proxy() as (_, proxy):
        reader, writer = await open_client(proxy)
        await proxy.set_refusing(True)
        r2, w2 = await open_client(proxy)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await roundtrip(r2, w2, b"no")
        assert proxy.counters["refused"] == 1
        assert await roundtrip(reader, writer, b"old link lives") == b"old link lives"
        await proxy.set_refusing(True, mode="closed")
        with pytest.raises(ConnectionRefusedError):
            await open_client(proxy)
        assert proxy.counters["listener_closed"] == 1
        await proxy.set_refusing(False)
        r3, w3 = await open_client(proxy)
        assert await roundtrip(r3, w3, b"back") == b"back"
        for w in (writer, w2, w3):
            w.close()


async def test_upstream_down_resets_the_client():
    async with EchoServer() as echo:
        port = echo.port
    async with FaultProxy(("127.0.0.1", port)) as proxy:
        reader, writer = await open_client(proxy)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        assert proxy.counters["upstream_failures"] == 1
        writer.close()


def test_background_proxy_from_synchronous_code():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with BackgroundProxy(("127.0.0.1", port), seed=1) as bg:
            client = socket.create_connection(("127.0.0.1", bg.port), timeout=5)
            server_side, _ = listener.accept()
            server_side.settimeout(5)
            client.sendall(b"via thread")
            assert server_side.recv(100) == b"via thread"
            bg.call("partition", "up")
            client.sendall(b"dropped")
            deadline = time.monotonic() + 5
            while bg.counters().get("partition_dropped_bytes", 0) < 7:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert bg.call("heal") == 1
            client.close()
            server_side.close()


# ----------------------------------------------------------- WebSocket level


@contextlib.asynccontextmanager
async def ws_echo_and_proxy(**options) -> AsyncIterator[tuple[list[bytes | str], FaultProxy]]:
    seen: list[bytes | str] = []

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                seen.append(message)
                await ws.send(message)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with FaultProxy(("127.0.0.1", port), websocket=True, **options) as proxy:
            yield seen, proxy


async def recv_n(ws, n: int, timeout: float = 5.0) -> list[bytes | str]:
    async with asyncio.timeout(timeout):
        return [await ws.recv() for _ in range(n)]


async def test_ws_passthrough_and_compression_is_not_negotiated():
    async with ws_echo_and_proxy() as (_, proxy):
        async with connect(proxy.url("ws")) as ws:
            assert ws.protocol.extensions == []
            await ws.send(b"\x00" * 200_000)  # 64-bit length, masked
            await ws.send("text")
            assert await recv_n(ws, 2) == [b"\x00" * 200_000, "text"]
        assert proxy.counters["ws_extensions_stripped"] == 1
        assert proxy.counters["ws_messages_up"] == 2
        await wait_for(lambda: proxy.counters["ws_messages_down"] == 2)
        assert proxy.counters["ws_control_frames"] >= 2  # the close handshake


async def test_ws_drop_a_client_message_by_content():
    async with ws_echo_and_proxy() as (seen, proxy):
        rule = proxy.add_ws_rule(WsAction.DROP, "up", match=lambda payload: payload == b"two")
        async with connect(proxy.url("ws")) as ws:
            for message in (b"one", b"two", b"three"):
                await ws.send(message)
            assert await recv_n(ws, 2) == [b"one", b"three"]
        assert seen == [b"one", b"three"]
        assert rule.fired == 1 and proxy.counters["ws_dropped"] == 1


async def test_ws_duplicate_and_reorder_server_messages():
    async with ws_echo_and_proxy() as (_, proxy):
        proxy.add_ws_rule("duplicate", "down", match=lambda p: p == b"1", count=1)
        proxy.add_ws_rule("reorder", "down", match=lambda p: p == b"2", count=1)
        async with connect(proxy.url("ws")) as ws:
            for i in range(1, 5):
                await ws.send(str(i).encode())
            assert await recv_n(ws, 5) == [b"1", b"1", b"3", b"2", b"4"]
        assert proxy.counters["ws_duplicated"] == 1
        assert proxy.counters["ws_reordered"] == 1


async def test_ws_reorder_without_a_successor_is_released_and_counted_as_expired():
    async with ws_echo_and_proxy(reorder_hold=0.05) as (_, proxy):
        proxy.add_ws_rule("reorder", "up", count=1)
        async with connect(proxy.url("ws")) as ws:
            await ws.send(b"alone")
            assert await recv_n(ws, 1) == [b"alone"]
        assert proxy.counters["ws_reorder_expired"] == 1
        assert proxy.counters["ws_reordered"] == 0


async def test_ws_fragmented_message_is_one_unit_and_control_frames_pass():
    async with ws_echo_and_proxy() as (seen, proxy):
        proxy.add_ws_rule("drop", "up", match=lambda p: p.startswith(b"frag"))
        async with connect(proxy.url("ws")) as ws:
            await ws.send([b"frag-", b"ment", b"ed"])  # three frames, one message
            # Pings pass although every matching data message is dropped.
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)
            await ws.send(b"whole")
            assert await recv_n(ws, 1) == [b"whole"]
        assert seen == [b"whole"]
        assert proxy.counters["ws_dropped"] == 1


async def test_ws_probabilistic_faults_are_seeded():
    outcomes = []
    for _ in range(2):
        async with ws_echo_and_proxy(seed=11) as (_, proxy):
            proxy.add_ws_rule("drop", "up", probability=0.3)
            async with connect(proxy.url("ws")) as ws:
                for i in range(40):
                    await ws.send(f"{i}")
                await wait_for(
                    lambda p=proxy: p.counters["ws_messages_up"] == 40,
                    message="all messages through the proxy",
                )
                dropped = proxy.counters["ws_dropped"]
                echoed = await recv_n(ws, 40 - dropped)
                assert len(echoed) == len(set(echoed))
            outcomes.append(dropped)
            assert 0 < dropped < 40
    assert outcomes[0] == outcomes[1]


async def test_ws_rules_need_websocket_mode():
    async with echo_and_proxy() as (_, proxy):
        with pytest.raises(ValueError):
            proxy.add_ws_rule("drop")


async def test_plain_http_through_websocket_mode_passes_raw():
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tests.servers import running

    async def hello(request):
        return PlainTextResponse("hi " * 1000)

    async with (
        running(Starlette(routes=[Route("/", hello)])) as srv,
        FaultProxy(("127.0.0.1", srv.port), websocket=True) as proxy,
    ):
        async with httpx.AsyncClient(base_url=proxy.url()) as http:
            for _ in range(3):  # keep-alive: several requests on one link
                response = await http.get("/")
                assert response.text == "hi " * 1000
        assert proxy.counters["ws_messages_up"] == 0
