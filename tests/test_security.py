"""Hostile input against a real server (SPEC promises 6 and 7; issue 8 part 3).

Bad tokens on every route and the WebSocket, role checks, cross-tenant access, browser
Origins, oversized frames and batches, floods, silent connections, the connection cap,
SQL-shaped ids, decoder fuzzing (Hypothesis) and schemathesis against the published
OpenAPI document. Each refusal is checked twice: the answer (status, close code, error
code) and the store, fingerprinted before and after (head, every table's row count,
every workflow's status and version) — a refusal must change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import jwt
import msgspec
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from protocol import (
    PROTOCOL_VERSION,
    Error,
    Events,
    Hello,
    Mutation,
    ProtocolError,
    PullResponse,
    Push,
    PushRequest,
    PushResponse,
    ReportStateArgs,
    Unauthorized,
    ValidationError,
    Welcome,
    WorkflowSnapshot,
    decode_client_message,
    decode_json,
    decode_server_message,
    encode,
    parse_mutation_args,
)
from sync_server import create_app
from sync_server.auth import bearer_token, verify_token
from sync_server.store.base import DlqEntry
from tests.conftest import PG_DSN, wait_for
from tests.servers import SECRET, RunningServer, running
from tests.sync_helpers import NOOP, RawClient, close_code_of, submit, token

pytestmark = pytest.mark.timeout(60)

TABLES = ("events", "workflows", "clients", "mutation_results", "outbox", "dlq", "breakers")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def make_app(database_url: str, **settings_: Any):
    return create_app(
        database_url, workflows=[NOOP], auth_secret=SECRET, run_sagas=False, **settings_
    )


# ------------------------------------------------------------------ store views


async def fingerprint(database_url: str) -> dict[str, Any]:
    """Row counts of every table plus every workflow's (id, tenant, status, version).

    Read with plain SQL beside the server, so a dropped table fails loudly here.
    """
    queries = {f"count:{table}": f"SELECT count(*) FROM {table}" for table in TABLES}
    queries["head"] = "SELECT coalesce(max(seq), 0) FROM events"
    workflows_sql = "SELECT id, tenant, status, version FROM workflows ORDER BY id"
    result: dict[str, Any] = {}
    if database_url.startswith("sqlite:"):
        con = sqlite3.connect(urlsplit(database_url).path)
        try:
            for key, sql in queries.items():
                result[key] = con.execute(sql).fetchone()[0]
            result["workflows"] = [tuple(row) for row in con.execute(workflows_sql)]
        finally:
            con.close()
        return result
    import asyncpg

    schema = parse_qs(urlsplit(database_url).query)["schema"][0]
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        for key, sql in queries.items():
            result[key] = await conn.fetchval(sql)
        result["workflows"] = [tuple(row) for row in await conn.fetch(workflows_sql)]
    finally:
        await conn.close()
    return result


def without_bookkeeping(view: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint minus clients/mutation_results: a *rejected* mutation is recorded by
    design (so the client never resends it), but it must change no workflow or event."""
    return {k: v for k, v in view.items() if k not in ("count:clients", "count:mutation_results")}


# ---------------------------------------------------------------------- helpers


def auth(tok: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"} if tok else {}


async def open_ws(url: str, *, header: str | None, origin: str | None = None):
    headers = {"Authorization": header} if header else {}
    if origin is not None:
        headers["Origin"] = origin
    return await connect(f"{url}/v1/sync", additional_headers=headers, max_size=None)


async def first_close(ws) -> tuple[int | None, list[Any]]:
    """Everything received until the close, and the close code."""
    received: list[Any] = []
    try:
        async with asyncio.timeout(10):
            while True:
                received.append(decode_server_message(await ws.recv()))
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), received


async def seed(server: RunningServer, tenant: str = "acme") -> tuple[str, int]:
    """One workflow (pushed by a client) and one dead letter for it; returns their ids."""
    wf = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        body = {"client_id": f"seed-{tenant}", "mutations": [msgspec.to_builtins(submit(1, wf))]}
        r = await http.post("/v1/push", json=body, headers=auth(token(tenant, f"seed-{tenant}")))
        assert r.json()["results"][0]["status"] == "applied"
    store = server.app.state.tether.store

    async def add(tx):
        return await tx.add_dlq(
            DlqEntry(
                id=0,
                tenant=tenant,
                workflow_id=wf,
                step="only",
                reason="attempts exhausted",
                attempts=3,
                last_error="boom",
                created_at=time.time(),
            )
        )

    return wf, await store.run(add)


def report_body(wf: str, source: str = "job-queue") -> dict[str, Any]:
    return {"workflow_id": wf, "source": source, "status": "completed", "at": time.time()}


def protected_routes(wf: str, dlq_id: int) -> list[tuple[str, str, Any]]:
    """Every authenticated HTTP route, with a well-formed body where it takes one."""
    push_body = {"client_id": "intruder", "mutations": [msgspec.to_builtins(submit(1))]}
    return [
        ("POST", "/v1/push", push_body),
        ("GET", "/v1/pull?cursor=0", None),
        ("GET", "/v1/workflows", None),
        ("GET", f"/v1/workflows/{wf}", None),
        ("POST", f"/v1/workflows/{wf}/cancel", None),
        ("POST", f"/v1/workflows/{wf}/retry", None),
        ("POST", "/v1/reports", report_body(wf)),
        ("GET", "/v1/dlq", None),
        ("POST", f"/v1/dlq/{dlq_id}/requeue", None),
    ]


def bad_headers() -> dict[str, str | None]:
    """Authorization headers that must all be refused with 401."""
    now = int(time.time())
    good = {"tenant": "acme", "sub": "c1", "role": "admin", "exp": now + 600}

    def signed(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
        return "Bearer " + jwt.encode(claims, key, algorithm=alg)

    return {
        "missing": None,
        "empty": "Bearer",
        "wrong-scheme": "Basic dXNlcjpwYXNz",
        "malformed": "Bearer not.a.jwt",
        "garbage": "Bearer " + "A" * 4000,
        "wrong-signature": signed(good, "another-secret-0123456789abcdef0123456789"),
        "expired": signed({**good, "exp": now - 30}),
        "not-yet-valid": signed({**good, "nbf": now + 3600}),
        "alg-none": "Bearer " + jwt.encode(good, None, algorithm="none"),
        "alg-hs512": signed(good, SECRET + SECRET, "HS512"),
        "no-exp": signed({k: v for k, v in good.items() if k != "exp"}),
        "no-tenant": signed({k: v for k, v in good.items() if k != "tenant"}),
        "empty-tenant": signed({**good, "tenant": ""}),
        "tenant-not-text": signed({**good, "tenant": 42}),
        "no-sub": signed({k: v for k, v in good.items() if k != "sub"}),
        "unknown-role": signed({**good, "role": "root"}),
    }


@pytest.fixture
async def server(database_url) -> AsyncIterator[RunningServer]:
    async with running(make_app(database_url)) as srv:
        srv.database_url = database_url  # type: ignore[attr-defined]
        yield srv


# --------------------------------------------------------------------- tokens


async def test_bad_tokens_on_every_http_route_get_401_and_change_nothing(server):
    wf, dlq_id = await seed(server)
    before = await fingerprint(server.database_url)
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for name, header in bad_headers().items():
            headers = {"Authorization": header} if header else {}
            for method, path, body in protected_routes(wf, dlq_id):
                r = await http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (name, method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "unauthorized", (name, path)
                assert r.json()["error"]["retryable"] is False
        # Probes and the schema are public and hold no tenant data.
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
    assert await fingerprint(server.database_url) == before


async def test_bad_tokens_on_the_websocket_are_refused_before_any_data(server):
    await seed(server)
    before = await fingerprint(server.database_url)
    for name, header in bad_headers().items():
        ws = await open_ws(server.ws_url, header=header)
        # Even a Hello sent at once gets nothing back but the close.
        hello = Hello(client_id="intruder", protocol_version=PROTOCOL_VERSION)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(encode(hello))
        code, received = await first_close(ws)
        assert (code, received) == (4401, []), name
    assert await fingerprint(server.database_url) == before


# ---------------------------------------------------------------------- roles


async def test_roles_each_route_refuses_the_wrong_role_with_403(server):
    wf, dlq_id = await seed(server)
    before = await fingerprint(server.database_url)
    forbidden = {
        "/v1/push": ("source", "admin"),
        f"/v1/workflows/{wf}/cancel": ("source",),
        f"/v1/workflows/{wf}/retry": ("source",),
        "/v1/reports": ("client",),
        "/v1/dlq": ("client", "source"),
        f"/v1/dlq/{dlq_id}/requeue": ("client", "source"),
    }
    refused = 0
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for method, path, body in protected_routes(wf, dlq_id):
            for role in forbidden.get(path.split("?")[0], ()):
                headers = auth(token("acme", f"{role}-1", role))
                r = await http.request(method, path, json=body, headers=headers)
                assert r.status_code == 403, (role, path, r.text)
                assert r.json()["error"]["code"] == "forbidden"
                refused += 1
        # A client may not report as the job queue over HTTP either (nor as anything).
        r = await http.post(
            "/v1/reports", json=report_body(wf, "mini-app"), headers=auth(token("acme"))
        )
        assert r.status_code == 403
    assert refused == 9
    assert await fingerprint(server.database_url) == before
    # Only clients sync: a source or admin token is refused on the WebSocket (4403).
    for role in ("source", "admin"):
        ws = await open_ws(server.ws_url, header=f"Bearer {token('acme', 'svc', role)}")
        assert await first_close(ws) == (4403, [])
    # A client reporting for a higher-priority source through its queue is rejected.
    client = await RawClient.open(server.ws_url, client_id="reporter")
    result = await client.push(
        [Mutation(id=1, name="report_state", args=report_body(wf, "job-queue"))]
    )
    assert result.results[0].status == "rejected"
    assert "mini-app" in result.results[0].error
    await client.close()
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    # The matrix is not all refusals: the right roles get through.
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.get("/v1/dlq", headers=auth(token("acme", "ops", "admin")))
        assert r.status_code == 200 and [e["id"] for e in r.json()["entries"]] == [dlq_id]
        r = await http.post(
            "/v1/reports", json=report_body(wf), headers=auth(token("acme", "jq", "source"))
        )
        assert r.status_code == 202


# --------------------------------------------------------------- cross-tenant


async def test_cross_tenant_read_pull_subscribe_cancel_retry_report_and_dlq(server):
    a = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="ca")
    wf = str(uuid.uuid4())
    await a.push([submit(1, wf)])
    await a.collect_until(1)
    _, dlq_id = await seed(server, "acme")
    b = await RawClient.open(server.ws_url, tok=token("globex", "b"), client_id="cb")
    first = await b.recv()  # catch-up from 0: the empty page of globex's events
    assert isinstance(first, Events) and first.events == []
    before = await fingerprint(server.database_url)
    acme_version = (await server.app.state.tether.store.get_workflow("acme", wf)).version
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        client, source, admin = (
            auth(token("globex", "b")),
            auth(token("globex", "jq", "source")),
            auth(token("globex", "ops", "admin")),
        )
        assert (await http.get(f"/v1/workflows/{wf}", headers=client)).status_code == 404
        assert (await http.get(f"/v1/workflows/{wf}", headers=admin)).status_code == 404
        pulled = (await http.get("/v1/pull", params={"cursor": 0}, headers=client)).json()
        assert pulled["events"] == []
        listed = (await http.get("/v1/workflows", headers=admin)).json()["workflows"]
        assert listed == []
        for verb in ("cancel", "retry"):
            for headers in (client, admin):
                r = await http.post(f"/v1/workflows/{wf}/{verb}", headers=headers)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        for headers in (source, admin):
            r = await http.post("/v1/reports", json=report_body(wf), headers=headers)
            assert r.status_code == 404
        dlq = (await http.get("/v1/dlq", params={"status": "all"}, headers=admin)).json()
        assert dlq["entries"] == []
        r = await http.post(f"/v1/dlq/{dlq_id}/requeue", headers=admin)
        assert r.status_code == 404
    assert await fingerprint(server.database_url) == before
    # Through globex's own mutation queue: the workflow does not exist for it.
    result = await b.push(
        [
            Mutation(id=1, name="cancel_workflow", args={"workflow_id": wf}),
            Mutation(id=2, name="retry_workflow", args={"workflow_id": wf}),
            Mutation(id=3, name="report_state", args=report_body(wf, "mini-app")),
        ]
    )
    assert [r.status for r in result.results] == ["rejected"] * 3, result
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    # acme's ids are not globex's: the same client id and workflow id are fresh for it.
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        body = {"client_id": "ca", "mutations": [msgspec.to_builtins(submit(1, wf))]}
        r = await http.post("/v1/push", json=body, headers=client)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "applied", r.text
    store = server.app.state.tether.store
    record = await store.get_workflow("acme", wf)
    assert (record.tenant, record.version) == ("acme", acme_version)
    assert (await store.get_workflow("globex", wf)).tenant == "globex"
    assert await store.get_client("acme", "ca") == ("a", 1)
    assert await store.get_client("globex", "ca") == ("b", 1)
    seen = await b.collect_until(1)  # globex's own submit of its "wf"
    assert len(seen) == 1 and seen[0].workflow_id == wf
    # Subscribe: acme's new event is not delivered live to globex. globex's own event
    # comes after it in the log, so it would have arrived first had it leaked.
    await a.push([submit(2)])
    await a.collect_until(2)
    assert (await b.push([submit(4)])).results[0].status == "applied"
    seen = await b.collect_until(2)
    assert len(seen) == 2 and seen[1].workflow_id != wf
    assert seen[1].seq > a.events[-1].seq
    # A global admin (tenant "*") does see acme's workflow: the scope check is real.
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.get(
            f"/v1/workflows/{wf}",
            params={"tenant": "acme"},
            headers=auth(token("*", "root", "admin")),
        )
        assert r.status_code == 200 and r.json()["id"] == wf
        r = await http.get(f"/v1/workflows/{wf}", headers=auth(token("*", "root", "admin")))
        assert r.status_code == 400 and "several tenants" in r.json()["error"]["message"]
    await a.close()
    await b.close()


# ------------------------------------------------------------------- origins


async def test_browser_origin_not_on_the_allow_list_gets_4403(sqlite_url):
    app = make_app(sqlite_url, allowed_origins=frozenset({"https://app.example"}))
    async with running(app) as srv:
        header = f"Bearer {token()}"
        for origin in ("https://evil.example", "null", "https://app.example.evil.com"):
            ws = await open_ws(srv.ws_url, header=header, origin=origin)
            assert await first_close(ws) == (4403, []), origin
        for origin in ("https://app.example", None):  # allowed, and non-browser clients
            ws = await open_ws(srv.ws_url, header=header, origin=origin)
            await ws.send(encode(Hello(client_id=f"o{origin}", protocol_version=1)))
            assert isinstance(decode_server_message(await ws.recv()), Welcome)
            await ws.close()
        assert await fingerprint(sqlite_url) == {
            **{f"count:{t}": 0 for t in TABLES},
            "head": 0,
            "workflows": [],
        }


# --------------------------------------------------------------------- sizes


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


# -------------------------------------------------------------------- floods


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


# ------------------------------------------------------ silence and capacity


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


# -------------------------------------------------------------- SQL-shaped ids

CRAFTED = [
    "'; DROP TABLE events; --",
    '" OR 1=1 --',
    "x'); DELETE FROM workflows; --",
    "1; UPDATE clients SET tenant='globex'",
    "$1 $$ %s %% \\' \\\\",
    "Robert'); DROP TABLE clients;--🙂",
    "a\x00b",  # NUL: PostgreSQL cannot store it; refused everywhere (see the test below)
]


async def test_sql_shaped_input_is_stored_verbatim_or_refused(server):
    await seed(server)
    store = server.app.state.tether.store
    before = await fingerprint(server.database_url)
    headers = auth(token())
    async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
        for crafted in CRAFTED:
            quoted = quote(crafted, safe="")
            # In workflow ids (paths and mutation args): not found or rejected.
            for path in (f"/v1/workflows/{quoted}", f"/v1/dlq/{quoted}/requeue"):
                r = await http.request(
                    "GET" if "dlq" not in path else "POST",
                    path,
                    headers=auth(token(role="admin")) if "dlq" in path else None,
                )
                assert r.status_code in (400, 404), (crafted, path, r.status_code)
            for verb in ("cancel", "retry"):
                r = await http.post(f"/v1/workflows/{quoted}/{verb}")
                assert r.status_code in (400, 404), (crafted, verb)
            # In query parameters: refused.
            for params in ({"cursor": crafted}, {"limit": crafted}):
                assert (await http.get("/v1/pull", params=params)).status_code == 400
            r = await http.get("/v1/workflows", params={"status": crafted})
            assert r.status_code == 400
            r = await http.get(
                "/v1/dlq", params={"status": crafted}, headers=auth(token(role="admin"))
            )
            assert r.status_code == 400
            cancel = {"id": 1, "name": "cancel_workflow", "args": {"workflow_id": crafted}}
            body = {"client_id": "sq", "mutations": [cancel]}
            r = await http.post("/v1/push", json=body)
            assert r.status_code in (200, 400), (crafted, r.status_code, r.text)
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    # In client ids, report details, workflow inputs and token claims: stored verbatim.
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for i, crafted in enumerate(CRAFTED):
            if "\x00" in crafted:
                continue
            workflow_id = str(uuid.uuid4())
            mutation = {
                "id": 1,
                "name": "submit_workflow",
                "args": {"workflow_id": workflow_id, "name": "noop", "input": {crafted: crafted}},
            }
            tok = token(crafted, crafted)
            r = await http.post(
                "/v1/push", json={"client_id": crafted, "mutations": [mutation]}, headers=auth(tok)
            )
            assert r.status_code == 200, (crafted, r.status_code, r.text)
            assert r.json()["results"][0]["status"] == "applied", (crafted, r.text)
            assert await store.get_client(crafted, crafted) == (crafted, 1)
            record = await store.get_workflow(crafted, workflow_id)
            assert (record.tenant, record.input) == (crafted, {crafted: crafted})
            detail = {"note": crafted, crafted: [crafted]}
            r = await http.post(
                "/v1/reports",
                json={**report_body(workflow_id), "detail": detail},
                headers=auth(token(crafted, f"src{i}", "source")),
            )
            assert r.status_code == 202, (crafted, r.text)
            events = await store.read_workflow_events(crafted, workflow_id)
            assert events[-1].data["detail"] == detail
    after = await fingerprint(server.database_url)
    for table in TABLES:  # every table is still there, and only grew
        assert after[f"count:{table}"] >= before[f"count:{table}"]
    assert after["count:events"] > before["count:events"]
    assert await store.get_client("acme", "seed-acme") == ("seed-acme", 1)


async def test_nul_characters_are_refused_alike_on_both_backends(server):
    """Regression: on PostgreSQL a NUL in an id, claim, input or detail was a 500 (and a
    retryable storage error that would wedge a client's queue); SQLite stored it."""
    wf, _ = await seed(server)
    before = await fingerprint(server.database_url)
    async with httpx.AsyncClient(base_url=server.http_url, headers=auth(token())) as http:
        body = {"client_id": "a\x00b", "mutations": [msgspec.to_builtins(submit(1))]}
        r = await http.post("/v1/push", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
        for path in ("/v1/workflows/a%00b", "/v1/workflows/a%00b/cancel"):
            method = "POST" if path.endswith("cancel") else "GET"
            assert (await http.request(method, path)).status_code == 404
        r = await http.get("/v1/pull", headers=auth(token("a\x00b", "x")))
        assert r.status_code == 401
        r = await http.post(
            "/v1/reports",
            json={**report_body(wf), "detail": {"k": "a\x00b"}},
            headers=auth(token(role="source")),
        )
        assert r.status_code == 422
        assert await fingerprint(server.database_url) == before
        # Inside a mutation: rejected and recorded, never a storage failure.
        mutation = submit(1)
        args = {**mutation.args, "input": {"a\x00b": 1}}
        body = {"client_id": "nul", "mutations": [{"id": 1, "name": mutation.name, "args": args}]}
        result = (await http.post("/v1/push", json=body)).json()["results"][0]
        assert result["status"] == "rejected" and "NUL" in result["error"]
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    ws = await open_ws(server.ws_url, header=f"Bearer {token()}")
    await ws.send(encode(Hello(client_id="a\x00b", protocol_version=PROTOCOL_VERSION)))
    code, received = await first_close(ws)
    assert code == 4400 and "NUL" in received[-1].message


# ------------------------------------------------------------ decoder fuzzing

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_tags = st.sampled_from(
    ["Hello", "Push", "Ack", "Welcome", "PushResult", "Events", "Progress", "Error", "x"]
)
_fields = st.sampled_from(
    ["client_id", "protocol_version", "cursor", "last_mutation_id", "mutations", "id", "name",
     "args", "created_at", "server_id", "head", "results", "events", "has_more", "code",
     "message", "retryable", "workflow_id", "step", "fraction", "seq", "type", "data", "at"]
)  # fmt: skip
_messages = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    _tags,
    st.dictionaries(_fields, _values, max_size=6),
)


@FUZZ
@given(st.binary(max_size=300) | _messages.map(msgspec.msgpack.encode))
def test_fuzz_msgpack_decoders_raise_only_protocol_errors(data):
    for decode in (decode_client_message, decode_server_message):
        with contextlib.suppress(ProtocolError):
            decode(data)


_BODY_TYPES = [PushRequest, PushResponse, PullResponse, ReportStateArgs, WorkflowSnapshot]


@FUZZ
@given(
    st.sampled_from(_BODY_TYPES),
    st.binary(max_size=200)
    | st.text(max_size=200)
    | _values.map(msgspec.json.encode)
    | st.dictionaries(_fields, _values, max_size=6).map(msgspec.json.encode),
)
def test_fuzz_json_decoders_raise_only_protocol_errors(body_type, data):
    with contextlib.suppress(ProtocolError):
        decode_json(data, body_type)


@FUZZ
@given(
    st.sampled_from(["submit_workflow", "cancel_workflow", "retry_workflow", "report_state", "x"]),
    st.dictionaries(
        st.sampled_from(["workflow_id", "name", "input", "source", "status", "at", "detail"]),
        _values | st.just(str(uuid.UUID(int=1))),
        max_size=6,
    ),
)
def test_fuzz_mutation_args_raise_only_validation_errors(name, args):
    with contextlib.suppress(ValidationError):
        parse_mutation_args(Mutation(id=1, name=name, args=args))


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_tokens_raise_only_unauthorized(raw):
    for header in (raw, f"Bearer {raw}"):
        with contextlib.suppress(Unauthorized):
            verify_token(SECRET, bearer_token(header))


def test_deeply_nested_input_is_a_protocol_error():
    for data in (b"[" * 100_000, b"\x91" * 100_000):
        for decode in (decode_client_message, decode_server_message):
            with pytest.raises(ProtocolError):
                decode(data)
        with pytest.raises(ProtocolError):
            decode_json(data, PushRequest)


# ---------------------------------------------------------------- schemathesis


def _run_schemathesis(base_url: str, tokens: dict[str, str], examples: int) -> Counter[int]:
    """Drive every operation of the served schema; return the statuses seen."""
    import schemathesis
    from hypothesis import Phase
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def runner(strategy, header: dict[str, str]):
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        @given(strategy)
        def run(case):
            response = case.call_and_validate(
                base_url=base_url, headers=header, checks=checks, timeout=10
            )
            statuses[response.status_code] += 1

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        role = {"/v1/reports": "source"}.get(operation.path, "client")
        if "/dlq" in operation.path or "/flags" in operation.path:
            role = "admin"
        header = {"Authorization": f"Bearer {tokens[role]}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(operation.as_strategy(generation_mode=mode), header)()
            except Unsatisfiable:  # no parameters or body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
    return statuses


async def test_schemathesis_finds_no_5xx_and_the_api_conforms(database_url):
    app = make_app(database_url, push_rate=10_000.0, push_burst=10_000.0)
    async with running(app) as srv:
        await seed(srv)
        tokens = {
            "client": token("acme", "fuzz"),
            "source": token("acme", "fuzz-src", "source"),
            "admin": token("acme", "fuzz-ops", "admin"),
        }
        statuses = await asyncio.to_thread(_run_schemathesis, srv.http_url, tokens, 8)
        assert all(status < 500 for status in statuses), statuses
        assert statuses[200] > 0 and sum(statuses.values()) > 80
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            document = (await http.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.1")
        paths = {route.path for route in srv.app.routes} - {"/v1/sync"}
        assert paths == set(document["paths"]), "every HTTP route is documented"
