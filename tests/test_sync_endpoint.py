"""The sync endpoint over real sockets, on SQLite and PostgreSQL: exactly-once push,
ordered delivery, isolation, bad input and restart."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import msgspec
import pytest

from protocol import PROTOCOL_VERSION, Ack, Events, Hello, Mutation, Push, encode
from sync_server import create_app
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.servers import SECRET, running
from tests.sync_helpers import NOOP, RawClient, close_code_of, submit, token

pytestmark = pytest.mark.timeout(90)


def make_app(database_url: str, **settings):
    return create_app(
        database_url, workflows=[NOOP], auth_secret=SECRET, run_sagas=False, **settings
    )


@pytest.fixture
async def server(database_url):
    async with running(make_app(database_url)) as srv:
        yield srv


async def store_snapshot(app) -> tuple[int, int]:
    store = app.state.tether.store
    head = await store.head()
    workflows = len(await store.list_workflows(limit=100_000))
    return head, workflows


async def test_same_batch_three_times_over_two_connections_applies_once(server):
    batch = [submit(i) for i in range(1, 101)]
    a = await RawClient.open(server.ws_url)
    b = await RawClient.open(server.ws_url)
    results = list(await asyncio.gather(a.push(batch), b.push(batch)))
    results.append(await a.push(batch))
    statuses: dict[int, list[str]] = {}
    for result in results:
        assert [r.id for r in result.results] == list(range(1, 101))
        for r in result.results:
            statuses.setdefault(r.id, []).append(r.status)
    for mid, seen in statuses.items():
        assert sorted(seen) == ["applied", "duplicate", "duplicate"], (mid, seen)
    store = server.app.state.tether.store
    assert await store.get_client("acme", "c1") == ("c1", 100)
    records = await store.list_workflows(tenant="acme", limit=1000)
    assert len(records) == 100
    events = await store.read_events(0, 10_000)
    submitted = [e for e in events if e.type == "workflow.submitted"]
    assert len(submitted) == 100
    assert sorted(e.data["workflow"]["id"] for e in submitted) == sorted(
        m.args["workflow_id"] for m in batch
    )
    await a.close()
    await b.close()


async def test_events_arrive_in_order_live_and_after_reconnect(server):
    watcher = await RawClient.open(server.ws_url, client_id="watcher")
    writer = await RawClient.open(server.ws_url, client_id="writer")
    await writer.push([submit(i) for i in range(1, 21)])
    events = await watcher.collect_until(20)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert all(e.data["workflow"]["status"] == "running" for e in events)
    cursor = watcher.cursor
    await watcher.close()
    await writer.push([submit(i) for i in range(21, 31)])
    again = await RawClient.open(server.ws_url, client_id="watcher", cursor=cursor)
    more = await again.collect_until(10)
    assert [e.seq for e in more] == sorted(e.seq for e in more)
    assert more[0].seq > cursor
    assert len(more) == 10
    await again.close()
    await writer.close()


async def test_rejections_are_recorded_and_gaps_refused(server):
    client = await RawClient.open(server.ws_url)
    bad = Mutation(
        id=1,
        name="submit_workflow",
        args={"workflow_id": str(uuid.uuid4()), "name": "no-such-workflow"},
    )
    cancel_missing = Mutation(id=2, name="cancel_workflow", args={"workflow_id": str(uuid.uuid4())})
    result = await client.push([bad, cancel_missing, submit(4)])
    r1, r2, r3 = result.results
    assert (r1.status, r2.status) == ("rejected", "rejected")
    assert "unknown workflow" in r1.error and "no workflow" in r2.error
    assert r3.status == "rejected" and r3.error.startswith("conflict:")
    store = server.app.state.tether.store
    assert await store.get_client("acme", "c1") == ("c1", 2)
    assert await store.head() == 0
    again = await client.push([bad])
    assert again.results[0].status == "duplicate"
    assert "unknown workflow" in again.results[0].error
    ok = await client.push([submit(3), submit(4)])
    assert [r.status for r in ok.results] == ["applied", "applied"]
    await client.close()


async def test_other_tenant_sees_nothing(server):
    a = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="ca")
    b = await RawClient.open(server.ws_url, tok=token("globex", "b"), client_id="cb")
    wf = str(uuid.uuid4())
    await a.push([submit(1, wf)])
    await a.collect_until(1)
    # B cannot cancel, retry or report on A's workflow: it does not exist for B.
    result = await b.push(
        [
            Mutation(id=1, name="cancel_workflow", args={"workflow_id": wf}),
            Mutation(id=2, name="retry_workflow", args={"workflow_id": wf}),
        ]
    )
    assert [r.status for r in result.results] == ["rejected", "rejected"]
    assert all("no workflow" in r.error for r in result.results)
    await b.push([submit(3)])
    received = await b.collect_until(1)
    assert len(received) == 1 and received[0].workflow_id != wf
    headers = {"Authorization": f"Bearer {token('globex', 'b')}"}
    async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
        assert (await http.get(f"/v1/workflows/{wf}")).status_code == 404
        pulled = (await http.get("/v1/pull", params={"cursor": 0})).json()
        assert [e["workflow_id"] for e in pulled["events"]] == [received[0].workflow_id]
        assert (await http.post(f"/v1/workflows/{wf}/cancel")).status_code == 404
        listed = (await http.get("/v1/workflows")).json()["workflows"]
        assert wf not in [w["id"] for w in listed]
    # A's client id used with B's token is simply B's own client (ids are per tenant).
    namesake = await RawClient.open(server.ws_url, tok=token("globex", "b"), client_id="ca")
    assert namesake.welcome is not None and namesake.welcome.last_mutation_id == 0
    await namesake.close()
    record = await server.app.state.tether.store.get_workflow("acme", wf)
    assert record.status == "running" and record.tenant == "acme"
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    "frame, code",
    [
        (os.urandom(64), 4400),
        (encode(Hello(client_id="c1", protocol_version=PROTOCOL_VERSION))[:-3], 4400),
        (msgspec.msgpack.encode({"type": "DropTables"}), 4400),
        (encode(Ack(cursor=0)), 4400),  # not Hello first
        (encode(Hello(client_id="c1", protocol_version=PROTOCOL_VERSION + 1)), 4409),
        (b"\x00" * (600 * 1024), 4413),
    ],
    ids=["random", "truncated", "unknown-type", "ack-first", "version", "oversized"],
)
async def test_bad_frames_get_close_codes_and_change_nothing(server, frame, code):
    before = await store_snapshot(server.app)
    client = await RawClient.open(server.ws_url, hello=False)
    await client.ws.send(frame)
    assert await close_code_of(client.ws) == code
    assert await store_snapshot(server.app) == before


async def test_text_frame_and_oversized_batch(server):
    client = await RawClient.open(server.ws_url, hello=False)
    await client.ws.send("hello")
    assert await close_code_of(client.ws) == 4400
    client = await RawClient.open(server.ws_url)
    too_many = [submit(i) for i in range(1, 502)]
    await client.ws.send(encode(Push(mutations=too_many)))
    assert await close_code_of(client.ws) == 4413
    assert await store_snapshot(server.app) == (0, 0)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer garbage.not.ajwt",
        "Basic dXNlcjpwYXNz",
        f"Bearer {token(ttl=-10)}",
        "Bearer "
        + __import__("jwt").encode(
            {"tenant": "acme", "sub": "x", "exp": int(time.time()) + 60},
            "wrong-secret-0123456789abcdef0123456789",
            algorithm="HS256",
        ),
    ],
    ids=["missing", "garbled", "wrong-scheme", "expired", "wrong-signature"],
)
async def test_bad_tokens_are_refused_before_any_data(server, header):
    from websockets.asyncio.client import connect

    headers = {"Authorization": header} if header else {}
    async with connect(f"{server.ws_url}/v1/sync", additional_headers=headers) as ws:
        assert await close_code_of(ws) == 4401
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        h = {"Authorization": header} if header else {}
        r = await http.post("/v1/push", headers=h, json={"client_id": "c", "mutations": []})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert (await http.get("/v1/pull", headers=h)).status_code == 401


async def test_silent_connection_is_closed(database_url):
    async with running(make_app(database_url, hello_timeout=0.3)) as srv:
        client = await RawClient.open(srv.ws_url, hello=False)
        assert await close_code_of(client.ws, timeout=10) == 4400


async def test_http_push_pull_and_bad_bodies(server):
    headers = {"Authorization": f"Bearer {token()}"}
    async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
        body = {"client_id": "h1", "mutations": [msgspec.to_builtins(submit(1))]}
        r = await http.post("/v1/push", json=body)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "applied"
        r = await http.post("/v1/push", json=body)
        assert r.json()["results"][0]["status"] == "duplicate"
        page = (await http.get("/v1/pull", params={"cursor": 0, "limit": 10})).json()
        assert len(page["events"]) == 1 and page["has_more"] is False
        wid = page["events"][0]["workflow_id"]
        assert (await http.get(f"/v1/workflows/{wid}")).json()["status"] == "running"
        before = await store_snapshot(server.app)
        assert (await http.post("/v1/push", content=b"{not json")).status_code == 400
        assert (await http.post("/v1/push", json={"client_id": "h1"})).status_code == 400
        big = b'{"client_id":"h1","mutations":[' + b" " * (600 * 1024) + b"]}"
        assert (await http.post("/v1/push", content=big)).status_code == 413
        assert (await http.get("/v1/pull", params={"cursor": "x"})).status_code == 400
        assert (await http.get("/v1/pull", params={"limit": 10**6})).status_code == 400
        assert (await http.get("/v1/workflows", params={"status": "x"})).status_code == 400
        sql = "'; DROP TABLE events; --"
        assert (await http.get(f"/v1/workflows/{sql}")).status_code == 404
        assert await store_snapshot(server.app) == before
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).json()["status"] == "ready"


async def test_restart_keeps_log_cursors_and_mutation_ids(database_url):
    async with running(make_app(database_url)) as srv:
        client = await RawClient.open(srv.ws_url)
        await client.push([submit(i) for i in range(1, 6)])
        await client.collect_until(5)
        cursor = client.cursor
        await client.close()
    async with running(make_app(database_url)) as srv:
        client = await RawClient.open(srv.ws_url, cursor=cursor)
        assert client.welcome.last_mutation_id == 5
        assert client.welcome.head == cursor
        result = await client.push([submit(5), submit(6)])
        assert [r.status for r in result.results] == ["duplicate", "applied"]
        events = await client.collect_until(1)
        assert events[0].seq > cursor
        await client.close()
    store = open_store(database_url)
    async with store:
        assert len(await store.read_events(0, 100)) == 6


async def test_catch_up_of_a_backlog_in_pages(server):
    writer = await RawClient.open(server.ws_url, client_id="w")
    for start in range(1, 1201, 400):
        await writer.push([submit(i) for i in range(start, start + 400)])
    reader = await RawClient.open(server.ws_url, client_id="r")
    events = await reader.collect_until(1200, timeout=30)
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert len(events) == 1200
    await wait_for(lambda: server.app.state.tether.connections == 2)
    await reader.close()
    await writer.close()


async def test_send_queue_overflow_cuts_slow_consumer(database_url):
    import socket

    from websockets.asyncio.client import connect

    app = make_app(database_url, send_queue_limit=4, page_size=50)
    async with running(app, sndbuf=4096) as srv:
        writer = await RawClient.open(srv.ws_url, client_id="w")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        slow_ws = await connect(
            f"{srv.ws_url}/v1/sync",
            sock=sock,
            max_queue=1,
            additional_headers={"Authorization": f"Bearer {token()}"},
        )
        slow = RawClient(slow_ws)
        await slow_ws.send(encode(Hello(client_id="slow", protocol_version=PROTOCOL_VERSION)))
        # The slow client reads nothing while live events pile up behind its buffers.
        mid = 0
        while srv.app.state.tether.metrics.slow_consumers._value.get() < 1 and mid < 20_000:
            await writer.push([submit(i) for i in range(mid + 1, mid + 101)])
            mid += 100
        assert srv.app.state.tether.metrics.slow_consumers._value.get() >= 1
        assert await close_code_of(slow.ws) == 1013
        # Nothing is lost: coming back from cursor 0, it catches up on everything.
        back = await RawClient.open(srv.ws_url, client_id="slow")
        events = await back.collect_until(mid, timeout=60)
        assert len({e.seq for e in events}) == mid
        await back.close()
        await writer.close()


def test_create_app_requires_a_secret(monkeypatch, sqlite_url):
    from protocol import UsageError

    monkeypatch.delenv("SYNC_AUTH_SECRET", raising=False)
    with pytest.raises(UsageError, match="SYNC_AUTH_SECRET"):
        create_app(sqlite_url)


async def test_events_pages_carry_has_more(server):
    writer = await RawClient.open(server.ws_url, client_id="w")
    await writer.push([submit(i) for i in range(1, 11)])
    raw = await RawClient.open(server.ws_url, client_id="r", hello=False)
    await raw.ws.send(encode(Hello(client_id="r", protocol_version=PROTOCOL_VERSION)))
    await raw.recv()  # Welcome
    page = await raw.recv()
    assert isinstance(page, Events) and len(page.events) == 10
    assert page.has_more is False and page.cursor == page.events[-1].seq


async def test_welcome_head_reveals_only_the_tenants_own_log(server):
    a = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="ca")
    await a.push([submit(i) for i in range(1, 6)])
    await a.collect_until(5)
    b = await RawClient.open(server.ws_url, tok=token("globex", "b"), client_id="cb")
    assert b.welcome.head == 0  # other tenants' activity stays invisible
    again = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="ca2")
    assert again.welcome.head == a.cursor
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert "head" not in (await http.get("/readyz")).json()
    for client in (a, b, again):
        await client.close()


async def test_a_mutation_the_store_refuses_is_rejected_and_the_batch_commits(server, monkeypatch):
    """No poison batch (issue 11): when the database refuses one mutation's data (not an
    outage), the others of its push commit and that one is answered ``rejected`` with the
    reason — instead of a retryable storage error that the client resends forever."""
    from protocol import StorageError

    store = server.app.state.tether.store
    tx_class = type(await store.run(_tx_itself))
    real = tx_class.insert_workflows

    async def picky(self, workflows):
        if any(w.input.get("poison") for w in workflows):
            raise StorageError("PostgreSQL failed: value refused") from ValueError("bad data")
        return await real(self, workflows)

    monkeypatch.setattr(tx_class, "insert_workflows", picky)
    good1, bad, good2 = (str(uuid.uuid4()) for _ in range(3))
    poison = Mutation(
        id=2,
        name="submit_workflow",
        args={"workflow_id": bad, "name": "noop", "input": {"poison": True}},
    )
    client = await RawClient.open(server.ws_url, client_id="poisoned")
    result = await client.push([submit(1, good1), poison, submit(3, good2)])
    assert [r.status for r in result.results] == ["applied", "rejected", "applied"]
    assert "refused by the store" in result.results[1].error
    assert await store.get_workflow("acme", good1) is not None
    assert await store.get_workflow("acme", good2) is not None
    assert await store.get_workflow("acme", bad) is None
    # The refusal is recorded: a resend is a duplicate carrying the same reason.
    again = await client.push([poison])
    assert again.results[0].status == "duplicate"
    assert "refused by the store" in again.results[0].error
    await client.close()


async def _tx_itself(tx):
    return tx
