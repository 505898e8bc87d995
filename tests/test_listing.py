"""Finding workflows (issue 18): the listing's parsing and cursors, ``GET /v1/workflows``
filters and keyset pages on both backends, the SDK's ``find_workflows``, the CLI, and
moving a workflow to another version (``POST /v1/workflows/{id}/upgrade``)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import pytest

from client_sdk import SyncClient, ValidationError
from protocol import BadMessage, WorkflowSnapshot
from sync_server import Step, Workflow, create_app, listing
from sync_server.cli import main
from tests.saga_helpers import submit
from tests.servers import SECRET, running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(90)


async def act(ctx):
    return None


ALPHA = Workflow("alpha", [Step("a", act), Step("b", act, depends_on=["a"])], version="a1")
ALPHA2 = Workflow(
    "alpha",
    [Step("a", act), Step("b2", act, depends_on=["a"]), Step("c", act, depends_on=["b2"])],
    version="a2",
)
BETA = Workflow("beta", [Step("x", act)])


# ------------------------------------------------------------------ pure parts


def test_times_as_unix_seconds_or_iso_8601():
    assert listing.parse_time("1767225600", "t") == 1767225600.0
    assert listing.parse_time("1767225600.25", "t") == 1767225600.25
    assert listing.parse_time("2026-01-01T00:00:00Z", "t") == 1767225600.0
    assert listing.parse_time("2026-01-01T01:00:00+01:00", "t") == 1767225600.0
    assert listing.parse_time("2026-01-01T00:00:00", "t") == 1767225600.0  # naive is UTC
    for bad in ("yesterday", "nan", "inf", "-5", "", "2026-13-01"):
        with pytest.raises(BadMessage):
            listing.parse_time(bad, "t")


def test_since_takes_a_duration_or_a_time():
    assert listing.parse_since("1h", 10_000.0) == 10_000.0 - 3600
    assert listing.parse_since("90s", 100.0) == 10.0
    assert listing.parse_since("7d", 1e6) == 1e6 - 7 * 86400
    assert listing.parse_since("2026-01-01T00:00:00Z", 0) == 1767225600.0
    with pytest.raises(BadMessage):
        listing.parse_since("1 hour", 0)


def test_cursor_round_trip_and_garbage():
    cursor = listing.encode_cursor(1767225600.123456, "0b7e")
    assert listing.decode_cursor(cursor) == (1767225600.123456, "0b7e")
    for bad in ("%%%", "bm90IGpzb24", listing.encode_cursor(1.0, "x")[:-3] + "AAA"):
        with pytest.raises(BadMessage):
            listing.decode_cursor(bad)


def test_a_page_is_bounded_in_bytes_and_always_moves_on(monkeypatch):
    big = "x" * 1000
    snaps = [WorkflowSnapshot(id=f"w{i}", name="n", status="running", error=big) for i in range(5)]
    keys = [(float(10 - i), f"w{i}") for i in range(5)]
    monkeypatch.setattr(listing, "MAX_PAGE_BYTES", 2500)
    page = listing.fit_page(snaps, keys, 4)
    assert [s.id for s in page["workflows"]] == ["w0", "w1"]
    assert listing.decode_cursor(page["next_cursor"]) == (9.0, "w1")
    monkeypatch.setattr(listing, "MAX_PAGE_BYTES", 10)
    assert len(listing.fit_page(snaps, keys, 4)["workflows"]) == 1  # never an empty page
    monkeypatch.setattr(listing, "MAX_PAGE_BYTES", 10**6)
    last = listing.fit_page(snaps[:3], keys[:3], 4)
    assert len(last["workflows"]) == 3 and last["next_cursor"] is None


# ------------------------------------------------------------------ over HTTP


@pytest.fixture
async def server(database_url):
    app = create_app(
        database_url, workflows=[ALPHA, ALPHA2, BETA], auth_secret=SECRET, run_sagas=False
    )
    async with running(app) as srv:
        yield srv


def _headers(tenant="acme", role="client"):
    return {"Authorization": f"Bearer {token(tenant, 'op', role)}"}


async def _fill(store):
    """acme: 6 alpha (a1) and 4 beta, one second apart; globex: 3 alpha."""
    base = 1_767_225_600.0
    ids = {}
    for i in range(10):
        wf = ALPHA if i % 5 < 3 else BETA
        [wid] = await submit(store, wf, tenant="acme", now=base + i)
        ids[wid] = (base + i, wf.name)
    for i in range(3):
        await submit(store, ALPHA, tenant="globex", now=base + i)
    return ids, base


async def _all_pages(http, **params):
    seen, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await http.get("/v1/workflows", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        seen.extend(body["workflows"])
        cursor = body["next_cursor"]
        if cursor is None:
            return seen


async def test_listing_pages_newest_first_filtered_and_tenant_scoped(server):
    store = server.app.state.tether.store
    ids, base = await _fill(store)
    async with httpx.AsyncClient(base_url=server.http_url, headers=_headers()) as http:
        listed = await _all_pages(http, limit=3)
        assert [w["id"] for w in listed] == sorted(ids, key=lambda w: ids[w][0], reverse=True)
        assert {w["workflow_version"] for w in listed if w["name"] == "alpha"} == {"a1"}
        assert {w["workflow_version"] for w in listed if w["name"] == "beta"} == {BETA.version}

        alphas = await _all_pages(http, name="alpha", limit=2)
        assert len(alphas) == 6 and all(w["name"] == "alpha" for w in alphas)
        assert len(await _all_pages(http, version="a1")) == 6
        assert await _all_pages(http, version="a2") == []
        assert len(await _all_pages(http, status="running")) == 10
        assert await _all_pages(http, status="completed") == []
        after = datetime.fromtimestamp(base + 7, UTC).isoformat()
        recent = await _all_pages(http, created_after=after)
        assert sorted(ids[w["id"]][0] for w in recent) == [base + 7, base + 8, base + 9]
        window = await _all_pages(http, created_after=base + 2, created_before=str(base + 4))
        assert sorted(ids[w["id"]][0] for w in window) == [base + 2, base + 3]

        for params in (
            {"status": "nope"},
            {"created_after": "yesterday"},
            {"created_before": "nan"},
            {"cursor": "garbage!"},
            {"limit": 0},
            {"limit": 10_001},
            {"name": "n" * 200},
        ):
            response = await http.get("/v1/workflows", params=params)
            assert response.status_code == 400, (params, response.text)
    async with httpx.AsyncClient(base_url=server.http_url, headers=_headers("globex")) as http:
        theirs = await _all_pages(http)
        assert len(theirs) == 3 and not set(ids) & {w["id"] for w in theirs}


async def test_cursor_is_stable_while_new_workflows_arrive(server):
    store = server.app.state.tether.store
    ids, base = await _fill(store)
    async with httpx.AsyncClient(base_url=server.http_url, headers=_headers()) as http:
        first = (await http.get("/v1/workflows", params={"limit": 4})).json()
        # Newer workflows land between two pages (same created_at as the cursor row too).
        await submit(store, BETA, tenant="acme", count=3, now=time.time())
        await submit(store, BETA, tenant="acme", now=base + 6)
        rest = await _all_pages(http, cursor=first["next_cursor"])
    got = [w["id"] for w in first["workflows"] + rest]
    assert len(got) == len(set(got))  # no repeats
    older = sorted(ids, key=lambda w: ids[w][0], reverse=True)
    assert [w for w in got if w in ids] == older  # nothing skipped, same order


async def test_sdk_find_workflows_pages_the_servers_listing(server, tmp_path):
    store = server.app.state.tether.store
    await _fill(store)
    async with SyncClient(
        server.ws_url, token=token("acme", "app"), path=str(tmp_path / "c.db")
    ) as client:
        page = await client.find_workflows(name="alpha", limit=4)
        assert len(page.workflows) == 4 and page.next_cursor
        more = await client.find_workflows(name="alpha", limit=4, cursor=page.next_cursor)
        assert len(more.workflows) == 2 and more.next_cursor is None
        assert {w.workflow_version for w in page.workflows + more.workflows} == {"a1"}
        with pytest.raises(ValidationError):
            await client.find_workflows(created_after="last week")


async def test_upgrade_moves_a_workflow_to_another_version(server):
    store = server.app.state.tether.store
    [wid] = await submit(store, ALPHA, tenant="acme")
    [done_a] = await submit(store, ALPHA, tenant="acme")
    record = await store.get_workflow("acme", done_a)
    record.state["steps"]["b"]["status"] = "succeeded"  # b ran: a2 has no b

    async def write(tx):
        await tx.update_workflow(record)

    await store.run(write)
    admin = _headers(role="admin")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        url = f"/v1/workflows/{wid}/upgrade"
        assert (await http.post(url, json={"version": "a2"}, headers=_headers())).status_code == 403
        missing = await http.post(url, json={"version": "a9"}, headers=admin)
        assert missing.status_code == 422 and "a1, a2" in missing.text
        assert (await http.post(url, json={}, headers=admin)).status_code in (400, 422)
        moved = await http.post(url, json={"version": "a2"}, headers=admin)
        assert moved.status_code == 202, moved.text
        view = moved.json()
        assert view["workflow_version"] == "a2" and set(view["steps"]) == {"a", "b2", "c"}
        again = await http.post(url, json={"version": "a2"}, headers=admin)
        assert again.status_code == 409
        lacking = await http.post(
            f"/v1/workflows/{done_a}/upgrade", json={"version": "a2"}, headers=admin
        )
        assert lacking.status_code == 409 and "b" in lacking.json()["error"]["message"]
        other = await http.post(url, json={"version": "a1"}, headers=_headers("globex", "admin"))
        assert other.status_code == 404
    events = [e.type for e in await store.read_workflow_events("acme", wid)]
    assert events[-1] == "workflow.upgraded"
    assert (await store.get_workflow("acme", done_a)).workflow_version == "a1"  # unchanged


async def test_cli_lists_by_version_and_since_and_upgrades(server, capsys, monkeypatch):
    monkeypatch.setenv("SYNC_AUTH_SECRET", SECRET)
    store = server.app.state.tether.store
    await _fill(store)  # created on 2026-01-01: older than an hour
    [fresh] = await submit(store, ALPHA, tenant="acme")
    url = server.http_url

    async def cli(*argv):
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--url", url])
        return code, capsys.readouterr()

    code, out = await cli("workflows", "list", "--version", "a1")
    assert code == 0 and "10 workflows" in out.out  # a global admin: every tenant's
    code, out = await cli("workflows", "list", "--since", "1h", "--name", "alpha")
    assert code == 0 and "1 workflows" in out.out and fresh[:8] in out.out
    code, out = await cli("workflows", "list", "--since", "2026-01-01T00:00:08Z")
    assert code == 0 and "3 workflows" in out.out
    code, out = await cli("workflows", "list", "--limit", "4")
    assert code == 0 and "4 workflows" in out.out
    code, out = await cli("workflows", "list", "--since", "a while")
    assert code == 2 and "--since" in out.err
    code, out = await cli("workflows", "upgrade", fresh, "--version", "a2")
    assert code == 0 and "now runs version a2" in out.out
    assert (await store.get_workflow("acme", fresh)).workflow_version == "a2"


async def test_listing_statements_use_the_tenant_led_indexes_on_postgres(pg_url):
    """Each filter's page is an index range scan led by the tenant, even under a generic
    plan (LESSONS: prepared statements and generic plans)."""
    from sync_server.store import open_store

    store = open_store(pg_url)
    await store.open()
    try:
        for tenant in ("acme", "globex", "initech"):
            await submit(store, ALPHA, tenant=tenant, count=700)
            await submit(store, BETA, tenant=tenant, count=300)
        # Realistic statistics: most workflows ended, a few still run or are parked.
        async with store._require_pool().acquire() as conn:
            await conn.execute(
                "UPDATE workflows SET status = CASE WHEN random() < 0.9 THEN 'completed' "
                "WHEN random() < 0.5 THEN 'parked' ELSE 'running' END"
            )
        captured = []
        fetch = store._fetch_all

        async def spy(sql, *args):
            captured.append((sql, args))
            return await fetch(sql, *args)

        store._fetch_all = spy
        cursor = (time.time(), "ffffffff")
        cases = {
            "workflows_tenant_created": {},
            "workflows_tenant_name_created": {"name": "beta"},
            "workflows_tenant_version_created": {"version": "a1"},
            "workflows_tenant_status_created": {"statuses": ["parked"]},
        }
        plans = {}
        pool = store._require_pool()
        for index, filters in cases.items():
            captured.clear()
            await store.list_workflows(tenant="acme", limit=51, before=cursor, **filters)
            [(sql, args)] = captured
            async with pool.acquire() as conn:
                await conn.execute("ANALYZE workflows")
                await conn.execute("SET plan_cache_mode = force_generic_plan")
                await conn.execute(f"PREPARE page AS {sql}")
                types = await conn.fetch(
                    "SELECT unnest(parameter_types)::text FROM pg_prepared_statements "
                    "WHERE name = 'page'"
                )
                values = ", ".join(
                    _literal(value, row[0]) for value, row in zip(args, types, strict=True)
                )
                rows = await conn.fetch(f"EXPLAIN EXECUTE page({values})")
                await conn.execute("DEALLOCATE page")
                await conn.execute("RESET plan_cache_mode")
            plans[index] = "\n".join(row[0] for row in rows)
    finally:
        await store.close()
    for index, plan in plans.items():
        assert index in plan and "Seq Scan" not in plan, (index, plan)


def _literal(value, type_name):
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(f"'{v}'" for v in value) + f"]::{type_name}"
    if isinstance(value, str):
        return f"'{value}'::{type_name}"
    return f"{value}::{type_name}"


async def test_listing_by_end_time(server):
    store = server.app.state.tether.store
    base = 1_767_225_600.0
    ids = [(await submit(store, BETA, tenant="acme", now=base + i))[0] for i in range(4)]
    # Two of them ended (at base + 100 and base + 200); the others still run.
    for wid, ended in ((ids[0], base + 100), (ids[2], base + 200)):
        record = await store.get_workflow("acme", wid)
        record.status, record.updated_at = "completed", ended

        async def write(tx, record=record):
            await tx.update_workflow(record)

        await store.run(write)
    async with httpx.AsyncClient(base_url=server.http_url, headers=_headers()) as http:
        ended = await _all_pages(http, ended_after=base + 50)
        assert [w["id"] for w in ended] == [ids[2], ids[0]]  # newest created first
        early = await _all_pages(http, ended_after=base, ended_before=str(base + 150))
        assert [w["id"] for w in early] == [ids[0]]
        assert (await http.get("/v1/workflows", params={"ended_after": "soon"})).status_code == 400
