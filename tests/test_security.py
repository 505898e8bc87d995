"""Hostile input against a real server (SPEC promises 6 and 7; issue 8 part 3).

Bad tokens on every route and the WebSocket, role checks, cross-tenant access, browser
Origins, oversized frames and batches, floods, silent connections, the connection cap,
SQL-shaped ids, decoder fuzzing (Hypothesis) and schemathesis against the published
OpenAPI document. Each refusal is checked twice: the answer (status, close code, error
code) and the store, fingerprinted before and after (head, every table's row count,
every workflow's status and version) — a refusal must change nothing.

Split by topic: this file (tokens, roles, tenants, Origins), test_security_limits.py,
test_security_input.py; shared helpers in security_helpers.py.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import websockets

from protocol import (
    PROTOCOL_VERSION,
    Events,
    Hello,
    Mutation,
    Welcome,
    decode_server_message,
    encode,
)
from tests import security_helpers
from tests.security_helpers import (
    TABLES,
    auth,
    fingerprint,
    first_close,
    make_app,
    open_ws,
    report_body,
    seed,
    without_bookkeeping,
)
from tests.servers import SECRET, running
from tests.sync_helpers import RawClient, submit, token

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
server = security_helpers.server
pytestmark = pytest.mark.timeout(60)


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
