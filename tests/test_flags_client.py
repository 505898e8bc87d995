"""Flags in the SDK: synced set, offline evaluation, the direct path, OpenFeature."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import Reason

from client_sdk.flags import DirectHandle
from client_sdk.openfeature import TetherProvider
from protocol.flags import bucket
from tests.client_helpers import fast_client, make_app, server_snapshots
from tests.conftest import wait_for
from tests.servers import running
from tests.sync_helpers import SUITE_TOKEN_TTL, token

pytestmark = pytest.mark.timeout(120)

ADMIN = {"Authorization": f"Bearer {token('*', 'ops', 'admin', ttl=SUITE_TOKEN_TTL)}"}


async def put(http: httpx.AsyncClient, name: str, value, rules=None, tenant=None) -> None:
    body = {"value": value} | ({"rules": rules} if rules else {})
    params = {"tenant": tenant} if tenant else {}
    r = await http.put(f"/v1/flags/{name}", json=body, params=params, headers=ADMIN)
    assert r.status_code == 200, r.text


async def test_client_syncs_flags_and_evaluates_offline_with_the_last_set(database_url, tmp_path):
    path = tmp_path / "app.db"
    async with (
        running(make_app(database_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
        fast_client(srv.ws_url, path) as client,
    ):
        await wait_for(lambda: client.flags.received >= 1, message="initial flag set")
        assert client.flag("color", "grey") == "grey"
        await put(http, "color", "blue")
        await put(
            http, "color", "red", rules=[{"value": "gold", "subjects": ["vip"]}], tenant="acme"
        )
        await put(http, "limit", 3, tenant="globex")  # another tenant's: never seen here
        await wait_for(lambda: client.flag("color", "grey") == "red", message="tenant flag")
        assert client.flag("color", "grey", key="vip") == "gold"
        assert client.flag("limit", 0) == 0
        r = await http.post("/v1/flags/new-ui/rollout", json={"percentage": 40}, headers=ADMIN)
        assert r.status_code == 200
        await wait_for(lambda: "new-ui" in client.flags.book, message="rollout flag")
        expected = {k: bucket("new-ui", k) < 40 for k in (f"u{i}" for i in range(200))}
        assert {k: client.flag("new-ui", None, key=k) for k in expected} == expected
        await wait_for(lambda: _stored_names(path) == ["color", "new-ui"], message="stored")
    # The server is gone: a new client on the same file evaluates with the last set.
    async with fast_client("ws://127.0.0.1:9", path, connect=False) as offline:
        assert offline.flag("color", "grey") == "red"
        assert offline.flag("color", "grey", key="vip") == "gold"
        assert {k: offline.flag("new-ui", None, key=k) for k in expected} == expected
        assert offline.flags.received == 0


def _stored_names(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM flags ORDER BY name")]


async def test_route_back_to_direct_path_loses_nothing_queued(database_url, tmp_path):
    path = tmp_path / "app.db"
    calls: list[dict] = []

    async def direct(payload: dict) -> dict:
        calls.append(payload)
        return {"direct": payload["n"]}

    async with (
        running(make_app(database_url)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        await put(http, "tether.route.noop", 100)
        async with fast_client(srv.ws_url, path) as client:
            client.register_direct("noop", direct)
            await wait_for(lambda: "tether.route.noop" in client.flags.book, message="flags")
        # Offline: these are queued in the file, through Tether (the route says 100 %).
        async with fast_client(srv.ws_url, path, connect=False) as offline:
            offline.register_direct("noop", direct)
            queued = [(await offline.submit_workflow("noop", {"n": i})).id for i in range(5)]
            assert offline.pending_count == 5 and calls == []
            assert offline.flags.counts == {("noop", "tether"): 5}
        # Roll back: everyone takes the direct path from now on.
        await put(http, "tether.route.noop", 0)
        async with fast_client(srv.ws_url, path) as client:
            client.register_direct("noop", direct)
            await wait_for(lambda: client.flags.received >= 1, message="flags on reconnect")
            await client.flush(timeout=20)  # the queued five are delivered, not dropped
            handle = await client.submit_workflow("noop", {"n": 99})
            assert isinstance(handle, DirectHandle) and handle.path == "direct"
            view = await handle.wait()
            assert view.status == "completed" and view.result == {"direct": 99}
            assert calls == [{"n": 99}]
            assert client.flags.counts == {("noop", "direct"): 1}
            assert client.pending_count == 0
            for workflow_id in queued:
                final = await client.wait(workflow_id, timeout=20)
                assert final.status == "completed"
            # A workflow with no direct path registered always goes through Tether.
            await put(http, "tether.route.other", 0)
            await wait_for(lambda: "tether.route.other" in client.flags.book)
            assert not isinstance(await client.submit_workflow("noop2", {}), DirectHandle)
        snapshots = await server_snapshots(database_url)
        assert {i for i in queued} <= set(snapshots)
        assert all(snapshots[i][0] == "completed" for i in queued)


async def test_partial_route_splits_by_subject(sqlite_url, tmp_path):
    async def direct(payload: dict) -> str:
        return "direct"

    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        r = await http.post(
            "/v1/flags/tether.route.noop/rollout", json={"percentage": 30}, headers=ADMIN
        )
        assert r.status_code == 200 and r.json()["after"]["default"] == 30
        async with fast_client(srv.ws_url, tmp_path / "a.db") as client:
            client.register_direct("noop", direct)
            await wait_for(lambda: "tether.route.noop" in client.flags.book)
            keys = [f"user-{i}" for i in range(40)]
            for key in keys:
                handle = await client.submit_workflow("noop", {}, key=key)
                through = bucket("tether.route.noop", key) < 30
                assert isinstance(handle, DirectHandle) is not through, key
            tether_count = sum(bucket("tether.route.noop", k) < 30 for k in keys)
            assert client.flags.counts == {
                ("noop", "tether"): tether_count,
                ("noop", "direct"): len(keys) - tether_count,
            }
            sample = client.flags.registry.get_sample_value(
                "tether_client_submits_total", {"workflow": "noop", "path": "direct"}
            )
            assert sample == len(keys) - tether_count
            timed = client.flags.registry.get_sample_value(
                "tether_client_direct_seconds_count", {"workflow": "noop"}
            )
            assert timed == len(keys) - tether_count


async def test_openfeature_client_returns_what_client_flag_returns(sqlite_url, tmp_path):
    async with (
        running(make_app(sqlite_url, run_sagas=False)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
    ):
        await put(http, "color", "blue", rules=[{"value": "gold", "subjects": ["vip"]}])
        await put(http, "limit", 7)
        await put(http, "ratio", 0.25)
        await put(
            http,
            "layout",
            {"columns": 3},
            rules=[{"value": {"columns": 1}, "workflows": ["mobile"]}],
        )
        r = await http.post("/v1/flags/new-ui/rollout", json={"percentage": 30}, headers=ADMIN)
        assert r.status_code == 200
        async with fast_client(srv.ws_url, tmp_path / "a.db") as client:
            await wait_for(lambda: len(client.flags.book) == 5, message="flags")
            api.set_provider(TetherProvider(client))
            try:
                of = api.get_client()
                for i in range(300):
                    key = "vip" if i == 0 else f"user-{i}"
                    ctx = EvaluationContext(targeting_key=key)
                    assert of.get_boolean_value("new-ui", False, ctx) == client.flag(
                        "new-ui", False, key=key
                    )
                    assert of.get_string_value("color", "x", ctx) == client.flag(
                        "color", "x", key=key
                    )
                assert of.get_string_value("color", "x", EvaluationContext("vip")) == "gold"
                assert of.get_integer_value("limit", 0) == client.flag("limit", 0) == 7
                assert of.get_float_value("ratio", 0.0) == client.flag("ratio", 0.0) == 0.25
                mobile = EvaluationContext("u", {"workflow": "mobile"})
                assert of.get_object_value("layout", {}, mobile) == {"columns": 1}
                assert (
                    of.get_object_value("layout", {}) == client.flag("layout", {}) == {"columns": 3}
                )
                # unknown flag and wrong type: the default, as client.flag gives for unknown
                assert of.get_boolean_value("missing", True) is client.flag("missing", True) is True
                details = of.get_boolean_details("color", False)
                assert details.value is False and details.error_code is not None
                split = of.get_boolean_details("new-ui", False, EvaluationContext("user-1"))
                assert split.reason in (Reason.SPLIT, Reason.STATIC)
                # without a targeting key the token's subject is the key, as in client.flag
                assert of.get_boolean_value("new-ui", False) == client.flag("new-ui", False)
            finally:
                api.shutdown()


async def test_kill_switch_reaches_the_sdk_as_a_rejection_with_its_reason(database_url, tmp_path):
    async with (
        running(make_app(database_url)) as srv,
        httpx.AsyncClient(base_url=srv.http_url) as http,
        fast_client(srv.ws_url, tmp_path / "a.db") as client,
    ):
        before = await client.submit_workflow("noop", {})
        assert (await client.wait(before.id, timeout=20)).status == "completed"
        await put(http, "tether.accept.noop", False)
        await wait_for(lambda: client.flag("tether.accept.noop", True) is False)
        refused = await client.submit_workflow("noop", {})
        await client.flush(timeout=20)
        view = client.get_workflow(refused.id)
        assert view is not None and not view.pending
        assert view.error is not None and view.error.startswith("disabled"), view
