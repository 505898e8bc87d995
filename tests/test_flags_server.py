"""Flags on the server: audited changes, admin scoping, propagation, the kill switch."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest

from protocol import PROTOCOL_VERSION, Events, Flags, Hello, MutationStatus, Welcome, encode
from sync_server import create_app
from sync_server.flags.service import FLAG_LOG_TENANT
from sync_server.saga.definitions import Step, Workflow
from tests.conftest import scaled, wait_for
from tests.servers import SECRET, running
from tests.sync_helpers import NOOP, SUITE_TOKEN_TTL, RawClient, submit, token

pytestmark = pytest.mark.timeout(120)

GLOBAL_ADMIN = {"Authorization": f"Bearer {token('*', 'ops', 'admin', ttl=SUITE_TOKEN_TTL)}"}
ACME_ADMIN = {"Authorization": f"Bearer {token('acme', 'alice', 'admin', ttl=SUITE_TOKEN_TTL)}"}


def make_app(url: str, workflows=(NOOP,), **settings):
    return create_app(url, workflows=list(workflows), auth_secret=SECRET, **settings)


async def flag_client(url: str, tenant: str = "acme", client_id: str = "c1") -> RawClient:
    """A raw client that announces it understands Flags; returns after Welcome."""
    from websockets.asyncio.client import connect

    ws = await connect(
        f"{url}/v1/sync",
        additional_headers={"Authorization": f"Bearer {token(tenant, 'c1')}"},
        max_size=None,
    )
    client = RawClient(ws)
    await ws.send(encode(Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION, flags=True)))
    first = await client.recv()
    assert isinstance(first, Welcome), first
    client.welcome = first
    return client


async def next_flags(client: RawClient, timeout: float = 5.0) -> Flags:
    async with asyncio.timeout(timeout):
        while True:
            message = await client.recv()
            if isinstance(message, Flags):
                return message
            client._take(message)


async def test_change_is_audited_and_reaches_clients(database_url):
    async with running(make_app(database_url, run_sagas=False)) as srv:
        client = await flag_client(srv.ws_url)
        initial = await next_flags(client)  # right after Welcome
        assert initial.flags == [] and initial.revision == 0
        other = await flag_client(srv.ws_url, tenant="globex", client_id="g1")
        await next_flags(other)
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            r = await http.put("/v1/flags/color", json={"value": "blue"}, headers=GLOBAL_ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["before"] is None and r.json()["after"]["version"] == 1
            # every tenant's clients get the global flag
            for c in (client, other):
                got = await next_flags(c)
                assert [(f.name, f.default) for f in got.flags] == [("color", "blue")]
            # a tenant flag overrides the global one, for that tenant only
            r = await http.put("/v1/flags/color", json={"value": "red"}, headers=ACME_ADMIN)
            assert r.status_code == 200, r.text
            got = await next_flags(client)
            assert [(f.name, f.default) for f in got.flags] == [("color", "red")]
            r = await http.post(
                "/v1/flags/color/rollout", json={"percentage": 10}, headers=GLOBAL_ADMIN
            )
            assert r.status_code == 422  # "blue" is not a boolean: no rollout, no change
            r = await http.put(
                "/v1/flags/color",
                json={"value": "green", "rules": [{"value": "pink", "subjects": ["bob"]}]},
                headers=GLOBAL_ADMIN,
            )
            assert r.status_code == 200
            got = await next_flags(other)
            assert got.flags[0].default == "green" and got.flags[0].rules[0].value == "pink"
            history = (await http.get("/v1/flags/color/history", headers=GLOBAL_ADMIN)).json()
            entries = history["history"]
            assert [e["version"] for e in entries] == [1, 2]
            assert entries[0]["before"] is None and entries[0]["after"]["default"] == "blue"
            assert entries[1]["before"]["default"] == "blue"
            assert entries[1]["after"]["default"] == "green"
            assert entries[1]["by"] == "*/ops" and entries[1]["at"] > 0
            acme = await http.get("/v1/flags/color/history", headers=ACME_ADMIN)
            assert [e["by"] for e in acme.json()["history"]] == ["acme/alice"]
            listed = (await http.get("/v1/flags?tenant=acme", headers=GLOBAL_ADMIN)).json()
            assert {(f["scope"], f.get("overridden", False)) for f in listed["flags"]} == {
                ("acme", False),
                ("*", True),
            }
        # the audit trail is in the log, but never on a client's channel
        store = srv.app.state.tether.store
        audit = [e for e in await store.read_events(0, 100) if e.tenant == FLAG_LOG_TENANT]
        assert len(audit) == 3
        assert all(e.type == "flag.changed" for e in audit)
        assert client.events == [] and other.events == []
        await client.close()
        await other.close()


async def test_an_old_client_gets_no_flags_message(database_url):
    async with running(make_app(database_url, run_sagas=False)) as srv:
        old = await RawClient.open(srv.ws_url)  # Hello without flags=True
        first = await old.recv()
        assert isinstance(first, Events)
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            r = await http.put("/v1/flags/x", json={"value": 1}, headers=GLOBAL_ADMIN)
            assert r.status_code == 200
        result = await old.push([submit(1)])  # the next frame is not a Flags message
        assert result.results[0].status is MutationStatus.APPLIED
        await old.close()


async def test_tenant_admin_is_held_to_its_tenant(database_url):
    async with (
        running(make_app(database_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        r = await http.put("/v1/flags/f?tenant=globex", json={"value": 1}, headers=GLOBAL_ADMIN)
        assert r.status_code == 200
        for method, path, body in [
            ("GET", "/v1/flags?tenant=globex", None),
            ("GET", "/v1/flags/f?tenant=globex", None),
            ("GET", "/v1/flags/f/history?tenant=globex", None),
            ("PUT", "/v1/flags/f?tenant=globex", {"value": 2}),
            ("POST", "/v1/flags/f/rollout?tenant=globex", {"percentage": 5}),
        ]:
            r = await http.request(method, path, json=body, headers=ACME_ADMIN)
            assert r.status_code == 403, (method, path, r.text)
        # without --tenant a tenant admin acts on its own tenant, never on every tenant
        r = await http.put("/v1/flags/f", json={"value": 3}, headers=ACME_ADMIN)
        assert r.status_code == 200 and r.json()["scope"] == "acme"
        listed = (await http.get("/v1/flags", headers=ACME_ADMIN)).json()["flags"]
        assert [(f["scope"], f["default"]) for f in listed] == [("acme", 3)]
        globex = (await http.get("/v1/flags/f?tenant=globex", headers=GLOBAL_ADMIN)).json()
        assert globex["default"] == 1 and globex["version"] == 1  # untouched
        client = {"Authorization": f"Bearer {token('acme', 'c1', 'client')}"}
        assert (await http.get("/v1/flags", headers=client)).status_code == 403
        assert (await http.get("/v1/flags")).status_code == 401


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/flags/f", b"{not json", 400),
        ("/v1/flags/f", b'{"value": NaN}', 400),
        ("/v1/flags/f", b'{"value": 1e400}', 400),
        ("/v1/flags/f", b'{"nothing": 1}', 400),
        ("/v1/flags/f", b'{"value": "a\\u0000b"}', 422),
        ("/v1/flags/f", b'{"value": 1, "rules": [{"value": 1, "percentage": 101}]}', 400),
        ("/v1/flags/f", b'{"value": "' + b"x" * 3000 + b'"}', 422),
        ("/v1/flags/f", b'{"value": "' + b"x" * 5000 + b'"}', 400),
        ("/v1/flags/tether.accept.noop", b'{"value": "no"}', 422),
        ("/v1/flags/tether.route.noop", b'{"value": 101}', 422),
        ("/v1/flags/f/rollout", b'{"percentage": -1}', 422),
        ("/v1/flags/f/rollout", b'{"percentage": "ten"}', 400),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(sqlite_url, path, body, status):
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        method = "POST" if path.endswith("rollout") else "PUT"
        headers = {**GLOBAL_ADMIN, "content-type": "application/json"}
        r = await http.request(method, path, content=body, headers=headers)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
        assert (await http.get("/v1/flags", headers=GLOBAL_ADMIN)).json()["flags"] == []
        assert (await http.get("/v1/flags/f/history", headers=GLOBAL_ADMIN)).json() == {
            "history": []
        }


async def test_flag_count_per_scope_is_bounded(sqlite_url, monkeypatch):
    import sync_server.flags.service as service

    monkeypatch.setattr(service, "MAX_FLAGS", 3)
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        for i in range(3):
            r = await http.put(f"/v1/flags/f{i}", json={"value": i}, headers=GLOBAL_ADMIN)
            assert r.status_code == 200
        r = await http.put("/v1/flags/f3", json={"value": 3}, headers=GLOBAL_ADMIN)
        assert r.status_code == 422 and "3 flags" in r.text
        r = await http.put("/v1/flags/f0", json={"value": 9}, headers=GLOBAL_ADMIN)
        assert r.status_code == 200  # changing an existing flag is fine


# ----------------------------------------------------------------- kill switch


class Gate:
    """A step that waits until the test opens the gate (an in-flight workflow)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    async def __call__(self, ctx) -> dict:
        self.entered.set()
        await self.open.wait()
        return {"ok": True}


async def kill_switch_scenario(url: str, instances: int, gate: Gate) -> None:
    slow = Workflow("slow", [Step("wait", gate, timeout=60)])
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running(make_app(url, workflows=[NOOP, slow])))
        b = a
        if instances == 2:
            b = await stack.enter_async_context(running(make_app(url, workflows=[NOOP, slow])))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=a.http_url))
        ca = await RawClient.open(a.ws_url, client_id="ca")
        cb = await RawClient.open(b.ws_url, tok=token("acme", "c2"), client_id="cb")
        in_flight = str(uuid.uuid4())
        first = await ca.push([submit(1, in_flight, name="slow")])
        assert first.results[0].status is MutationStatus.APPLIED
        await asyncio.wait_for(gate.entered.wait(), 20)

        r = await http.put(
            "/v1/flags/tether.accept.slow", json={"value": False}, headers=GLOBAL_ADMIN
        )
        assert r.status_code == 200
        switched = time.monotonic()
        refused: dict[str, float] = {}

        ids = {"a": 2, "b": 1}

        async def send(name: str, client: RawClient, workflow: str):
            result = (await client.push([submit(ids[name], name=workflow)])).results[0]
            ids[name] += 1
            return result

        async def refused_on(name: str, client: RawClient) -> None:
            while True:
                result = await send(name, client, "slow")
                if result.status is MutationStatus.REJECTED:
                    assert result.error is not None and result.error.startswith("disabled")
                    refused[name] = time.monotonic() - switched
                    return

        await asyncio.wait_for(asyncio.gather(refused_on("a", ca), refused_on("b", cb)), 5)
        assert max(refused.values()) < scaled(1.0), refused
        refusals = sum(
            inst.app.state.tether.metrics.registry.get_sample_value(
                "tether_submits_disabled_total", {"workflow": "slow"}
            )
            or 0
            for inst in {id(a): a, id(b): b}.values()
        )
        assert refusals >= 2
        # other workflows are unaffected; the same refusal stays (not a flap)
        assert (await send("b", cb, "noop")).status is MutationStatus.APPLIED
        assert (await send("a", ca, "slow")).status is MutationStatus.REJECTED
        # the workflow that was in flight finishes
        gate.open.set()
        store = a.app.state.tether.store

        async def finished() -> bool:
            record = await store.get_workflow("acme", in_flight)
            return record is not None and record.status == "completed"

        await wait_for(finished, timeout=20)
        # turning it back on accepts new submits again, on both instances
        r = await http.put(
            "/v1/flags/tether.accept.slow", json={"value": True}, headers=GLOBAL_ADMIN
        )
        assert r.status_code == 200

        async def accepted() -> bool:
            return (await send("b", cb, "slow")).status is MutationStatus.APPLIED

        await wait_for(accepted, timeout=5)
        gate.open.set()
        await ca.close()
        await cb.close()


async def test_kill_switch_refuses_on_both_instances_within_a_second(pg_url):
    await kill_switch_scenario(pg_url, 2, Gate())


async def test_kill_switch_on_sqlite(sqlite_url):
    # SQLite serves one instance: two clients on it.
    await kill_switch_scenario(sqlite_url, 1, Gate())


async def test_change_via_a_reaches_clients_on_b_within_a_second(pg_url):
    async with (
        running(make_app(pg_url, run_sagas=False)) as a,
        running(make_app(pg_url, run_sagas=False)) as b,
        httpx.AsyncClient(base_url=a.http_url) as http,
    ):
        on_b = await flag_client(b.ws_url)
        await next_flags(on_b)
        latencies = []
        for i in range(1, 6):
            started = time.monotonic()
            r = await http.put("/v1/flags/f?tenant=acme", json={"value": i}, headers=GLOBAL_ADMIN)
            assert r.status_code == 200
            got = await next_flags(on_b, timeout=scaled(1.0))
            latencies.append(time.monotonic() - started)
            assert [(f.name, f.default) for f in got.flags] == [("f", i)]
        assert max(latencies) < scaled(1.0), latencies
        await on_b.close()


async def test_a_tenant_dropped_from_the_cache_still_gets_its_changes(sqlite_url, monkeypatch):
    import sync_server.flags.service as service

    monkeypatch.setattr(service, "MAX_CACHED_TENANTS", 1)
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        acme = await flag_client(srv.ws_url)
        await next_flags(acme)
        globex = await flag_client(srv.ws_url, tenant="globex", client_id="g1")
        await next_flags(globex)
        flags = srv.app.state.tether.flags
        assert "acme" not in flags._books  # dropped to make room for globex
        r = await http.put("/v1/flags/f", json={"value": 1}, headers=ACME_ADMIN)
        assert r.status_code == 200
        got = await next_flags(acme)
        assert [(f.name, f.default) for f in got.flags] == [("f", 1)]
        await acme.close()
        await globex.close()


async def test_a_global_change_recompiles_only_the_tenants_connected_here(sqlite_url):
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        for tenant in ("t1", "t2", "t3"):  # pushes compile each tenant's set (kill switch)
            r = await http.post(
                "/v1/push",
                json={
                    "client_id": f"c-{tenant}",
                    "mutations": [
                        {
                            "id": 1,
                            "name": "submit_workflow",
                            "args": {"workflow_id": str(uuid.uuid4()), "name": "noop", "input": {}},
                        }
                    ],
                },
                headers={"Authorization": f"Bearer {token(tenant, 'app')}"},
            )
            assert r.status_code == 200, r.text
        flags = srv.app.state.tether.flags
        assert {"t1", "t2", "t3"} <= set(flags._books)
        acme = await flag_client(srv.ws_url)
        await next_flags(acme)
        r = await http.put("/v1/flags/g", json={"value": True}, headers=GLOBAL_ADMIN)
        assert r.status_code == 200
        got = await next_flags(acme)
        assert [(f.name, f.default) for f in got.flags] == [("g", True)]
        assert set(flags._books) == {"acme"}  # the others recompile when next used
        r = await http.post(
            "/v1/push",
            json={
                "client_id": "c-t1",
                "mutations": [
                    {
                        "id": 2,
                        "name": "submit_workflow",
                        "args": {"workflow_id": str(uuid.uuid4()), "name": "noop", "input": {}},
                    }
                ],
            },
            headers={"Authorization": f"Bearer {token('t1', 'app')}"},
        )
        assert r.json()["results"][0]["status"] == "applied"
        assert "g" in flags._books["t1"]
        await acme.close()


async def test_no_token_may_hold_the_flag_log_tenant(sqlite_url):
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        r = await http.put("/v1/flags/f", json={"value": 1}, headers=GLOBAL_ADMIN)
        assert r.status_code == 200
        spy = {"Authorization": f"Bearer {token(FLAG_LOG_TENANT, 'spy')}"}
        r = await http.get("/v1/pull", params={"cursor": 0}, headers=spy)
        assert r.status_code == 401 and "reserved" in r.text


async def test_a_change_made_while_b_lost_its_listener_still_reaches_b(pg_url):
    import asyncpg

    from tests.conftest import PG_DSN

    async with (
        running(make_app(pg_url, run_sagas=False)) as a,
        running(make_app(pg_url, run_sagas=False)) as b,
        httpx.AsyncClient(base_url=a.http_url) as http,
    ):
        on_b = await flag_client(b.ws_url)
        await next_flags(on_b)
        reconnected = asyncio.Event()
        b.app.state.tether.store.on_reconnect(reconnected.set)
        schema = pg_url.rsplit("schema=", 1)[1]
        admin = await asyncpg.connect(PG_DSN)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                f"tether-listen:{schema}",
            )
        finally:
            await admin.close()
        assert killed >= 1  # the fault really happened
        # Written while B's listener may be down: its notification may be gone for good.
        r = await http.put(
            "/v1/flags/tether.accept.noop", json={"value": False}, headers=GLOBAL_ADMIN
        )
        assert r.status_code == 200
        await asyncio.wait_for(reconnected.wait(), 30)
        got = await next_flags(on_b, timeout=30)
        assert [(f.name, f.default) for f in got.flags] == [("tether.accept.noop", False)]
        book = await b.app.state.tether.flags.book("acme")
        assert not book.accepts("noop")
        await on_b.close()


async def test_concurrent_changes_of_one_flag_are_serialised(database_url):
    async with (
        running(make_app(database_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        answers = await asyncio.gather(
            *(http.put("/v1/flags/race", json={"value": i}, headers=GLOBAL_ADMIN) for i in range(8))
        )
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
        versions = sorted(r.json()["after"]["version"] for r in answers)
        assert versions == list(range(1, 9))
        history = (await http.get("/v1/flags/race/history", headers=GLOBAL_ADMIN)).json()
        assert [h["version"] for h in history["history"]] == list(range(1, 9))
        assert [h["before"] is None for h in history["history"]].count(True) == 1
