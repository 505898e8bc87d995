"""Security: size limits, floods, idle and surplus connections (split from test_security.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import websockets

from protocol import (
    Error,
    Hello,
    Push,
    Welcome,
    decode_server_message,
    encode,
)
from tests.conftest import wait_for
from tests.security_helpers import (
    auth,
    fingerprint,
    first_close,
    make_app,
    open_ws,
    without_bookkeeping,
)
from tests.servers import running
from tests.sync_helpers import RawClient, close_code_of, submit, token

pytestmark = pytest.mark.timeout(60)


async def test_oversized_frames_bodies_batches_and_inputs_are_refused(database_url):
    limit = 128 * 1024
    async with running(make_app(database_url, max_frame_bytes=limit)) as srv:
        before = await fingerprint(database_url)
        client = await RawClient.open(srv.ws_url)
        await client.ws.send(b"\x91" + b"\x00" * limit)
        code, received = await first_close(client.ws)
        assert code == 4413 and isinstance(received[-1], Error)
        assert received[-1].code == "too_large"
        # A batch over MAX_BATCH is refused whole, as too large.
        client = await RawClient.open(srv.ws_url)
        await client.ws.send(encode(Push(mutations=[submit(i) for i in range(1, 502)])))
        assert await close_code_of(client.ws) == 4413
        assert await fingerprint(database_url) == before
        headers = auth(token())
        async with httpx.AsyncClient(base_url=srv.http_url, headers=headers) as http:
            big = b'{"client_id":"h","mutations":[' + b" " * limit + b"]}"
            assert (await http.post("/v1/push", content=big)).status_code == 413

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to trust
                yield b'{"client_id":"h","mutations":['
                for _ in range(10):
                    yield b" " * (limit // 8)
                yield b"]}"

            r = await http.post("/v1/push", content=chunked())
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
            r = await http.post("/v1/reports", content=big, headers=auth(token(role="source")))
            assert r.status_code == 413
            body = {
                "client_id": "h",
                "mutations": [msgspec.to_builtins(submit(i)) for i in range(1, 502)],
            }
            assert (await http.post("/v1/push", json=body)).status_code == 413
            assert (await http.get("/v1/pull", params={"limit": 1001})).status_code == 400
            assert await fingerprint(database_url) == before
            # A workflow input over 64 KiB inside an acceptable body: rejected, not stored.
            mutation = submit(1)
            big_input = {**mutation.args, "input": {"blob": "x" * (70 * 1024)}}
            body = {
                "client_id": "h",
                "mutations": [{"id": 1, "name": mutation.name, "args": big_input}],
            }
            r = await http.post("/v1/push", json=body)
            assert r.json()["results"][0]["status"] == "rejected"
        assert without_bookkeeping(await fingerprint(database_url)) == without_bookkeeping(before)


async def test_websocket_flood_gets_4429_with_a_retry_hint(database_url):
    async with running(make_app(database_url, push_rate=1.0, push_burst=3)) as srv:
        client = await RawClient.open(srv.ws_url)
        for i in range(1, 4):
            result = await client.push([submit(i)])
            assert result.results[0].status == "applied"
        before = await fingerprint(database_url)
        await client.ws.send(encode(Push(mutations=[submit(4)])))
        code, received = await first_close(client.ws)
        errors = [m for m in received if isinstance(m, Error)]
        assert code == 4429
        assert errors and errors[-1].code == "rate_limited" and errors[-1].retryable
        assert "retry after" in errors[-1].message
        assert await fingerprint(database_url) == before
        assert srv.app.state.tether.metrics.rate_limited._value.get() >= 1


async def test_http_flood_gets_429_with_retry_after(database_url):
    app = make_app(database_url, push_rate=0.5, push_burst=3)
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:

        async def push(tok: str, client_id: str, mid: int = 1) -> httpx.Response:
            body = {"client_id": client_id, "mutations": [msgspec.to_builtins(submit(mid))]}
            return await http.post("/v1/push", json=body, headers=auth(tok))

        flooder = token("acme", "flooder")
        for mid in range(1, 4):
            assert (await push(flooder, "f1", mid)).status_code == 200
        before = await fingerprint(database_url)
        r = await push(flooder, "f1", 4)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["retryable"] is True
        # A fresh client id per request does not buy a fresh bucket.
        r = await push(flooder, "f-rotated", 1)
        assert r.status_code == 429, "rotating client ids evades the rate limit"
        assert await fingerprint(database_url) == before
        # Another tenant pushing under acme's client id spends its own budget (the id is
        # globex's own client there), never acme's.
        victim = token("acme", "victim")
        assert (await push(victim, "victim-device", 1)).status_code == 200
        refusals = [
            (await push(token("globex", "mallory"), "victim-device", 1 + n)).status_code
            for n in range(4)
        ]
        assert refusals == [200, 200, 200, 429]
        r = await push(victim, "victim-device", 2)
        assert r.status_code == 200, r.text


async def test_connection_that_never_says_hello_is_closed_4400(sqlite_url):
    async with running(make_app(sqlite_url, hello_timeout=0.3)) as srv:
        ws = await open_ws(srv.ws_url, header=f"Bearer {token()}")
        code, received = await first_close(ws)
        assert code == 4400
        assert isinstance(received[-1], Error) and "Hello" in received[-1].message
        await wait_for(lambda: srv.app.state.tether.connections == 0)
        # A client that did say Hello may stay quiet well past the Hello timeout.
        client = await RawClient.open(srv.ws_url)
        await client.recv()  # the caught-up page
        await asyncio.sleep(0.5)  # longer than hello_timeout, on purpose
        assert srv.app.state.tether.connections == 1
        await client.close()


async def test_connection_cap_answers_1013(sqlite_url):
    async with running(make_app(sqlite_url, max_connections=2)) as srv:
        held = [await RawClient.open(srv.ws_url, client_id=f"k{i}") for i in range(2)]
        ws = await open_ws(srv.ws_url, header=f"Bearer {token()}")
        assert await first_close(ws) == (1013, [])
        await held[0].close()
        await wait_for(lambda: srv.app.state.tether.connections == 1)
        again = await RawClient.open(srv.ws_url, client_id="k2")
        await again.close()
        await held[1].close()
        await wait_for(lambda: srv.app.state.tether.connections == 0)

        # A burst of simultaneous upgrades must not slip past the cap.
        async def attempt(i: int) -> bool:
            ws = await open_ws(srv.ws_url, header=f"Bearer {token()}")
            try:
                await ws.send(encode(Hello(client_id=f"burst{i}", protocol_version=1)))
                return isinstance(decode_server_message(await ws.recv()), Welcome)
            except websockets.ConnectionClosed:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(12)))
        assert srv.app.state.tether.connections <= 2
        assert sum(results) <= 2, f"{sum(results)} connections admitted with a cap of 2"
