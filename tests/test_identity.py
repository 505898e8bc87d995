"""Identity and namespacing (SPEC promise 6; issue 11 findings 7, 8, 9 and 10).

* A client id belongs to the (tenant, subject) that first used it: another subject of
  the same tenant is refused with 4403 / 403 and nothing it sends is applied.
* Workflow ids and client ids are namespaced by tenant: another tenant's use of an id
  behaves exactly like a fresh id — no "already in use", no "belongs to another
  tenant", no lock-out — and each tenant's workflow runs and ends on its own.
* Out-of-range or malformed ids and query values are 404/400, never 500.
* A mutation id repeated inside one batch is answered ``duplicate``.

Every test runs on SQLite and PostgreSQL (the ``database_url`` fixture), against a real
uvicorn server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from protocol import PROTOCOL_VERSION, Error, Hello, Mutation, encode
from sync_server import create_app
from tests.conftest import wait_for
from tests.servers import SECRET, RunningServer, running
from tests.sync_helpers import NOOP, RawClient, close_code_of, submit, token

pytestmark = pytest.mark.timeout(60)


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
async def server(database_url) -> AsyncIterator[RunningServer]:
    app = create_app(database_url, workflows=[NOOP], auth_secret=SECRET, run_sagas=True)
    async with running(app) as srv:
        yield srv


async def http_push(
    server: RunningServer, tok: str, client_id: str, mutations: list[Mutation]
) -> httpx.Response:
    body = {"client_id": client_id, "mutations": [msgspec.to_builtins(m) for m in mutations]}
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        return await http.post("/v1/push", json=body, headers=auth(tok))


async def workflow(server: RunningServer, tok: str, wf: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.get(f"/v1/workflows/{wf}", headers=auth(tok))
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# ----------------------------------------------------------------- finding 7


async def test_another_subject_of_the_tenant_cannot_use_a_client_id(server):
    """Finding 7: subject a2 pushing with a's client id used to make a's real mutation 2
    a silent ``duplicate``. Now a2 gets 4403 / 403 and a's mutation 2 is applied."""
    owner = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="phone-a")
    first = await owner.push([submit(1)])
    assert first.results[0].status == "applied"

    # WebSocket: Hello with a's client id from subject a2 is refused before Welcome.
    hijack = await RawClient.open(
        server.ws_url, tok=token("acme", "a2"), client_id="phone-a", hello=False
    )
    await hijack.ws.send(
        encode(Hello(client_id="phone-a", protocol_version=PROTOCOL_VERSION, cursor=0))
    )
    answer = await hijack.recv()
    assert isinstance(answer, Error) and answer.code == "forbidden", answer
    assert "another subject" in answer.message
    assert await close_code_of(hijack.ws) == 4403

    # HTTP push: 403 with the same clear message, and nothing applied or recorded.
    stolen = str(uuid.uuid4())
    r = await http_push(server, token("acme", "a2"), "phone-a", [submit(2, stolen)])
    assert r.status_code == 403, r.text
    assert "another subject" in r.json()["error"]["message"]
    assert await workflow(server, token("acme", "a"), stolen) is None

    # a's own mutation 2 is applied, not answered "duplicate".
    mine = str(uuid.uuid4())
    second = await owner.push([submit(2, mine)])
    assert second.results[0].status == "applied", second
    assert (await workflow(server, token("acme", "a"), mine)) is not None
    # The owner itself reconnects freely.
    again = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="phone-a")
    assert again.welcome is not None and again.welcome.last_mutation_id == 2
    await again.close()
    await owner.close()


# ----------------------------------------------------------------- finding 8


async def test_workflow_and_client_ids_are_namespaced_by_tenant(server):
    """Finding 8: B's use of ids A holds behaves exactly as fresh ids would."""
    wf = str(uuid.uuid4())
    a = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="shared")
    assert (await a.push([submit(1, wf)])).results[0].status == "applied"
    a_done = await wait_for(lambda: _status(server, token("acme", "a"), wf, "completed"), 20, 0.05)
    assert a_done

    # B says Hello with A's client id: a fresh client for B (Welcome, nothing applied).
    b = await RawClient.open(server.ws_url, tok=token("globex", "b"), client_id="shared")
    assert b.welcome is not None and b.welcome.last_mutation_id == 0
    # B submits A's workflow id: applied as B's own workflow, which runs to the end.
    b_submit = Mutation(
        id=1,
        name="submit_workflow",
        args={"workflow_id": wf, "name": "noop", "input": {"who": "b"}},
    )
    result = await b.push([b_submit])
    assert [r.status for r in result.results] == ["applied"], result
    await wait_for(lambda: _status(server, token("globex", "b"), wf, "completed"), 20, 0.05)
    theirs = await workflow(server, token("acme", "a"), wf)
    assert theirs is not None and theirs["status"] == "completed"
    # Each tenant sees its own events of that id, and only its own: B's log starts with
    # its own submit (B's input) and A's log holds no event with B's input.
    b_events = await b.collect_until(3)
    assert {e.workflow_id for e in b_events} == {wf}
    assert b_events[0].type == "workflow.submitted" and b_events[0].data["input"] == {"who": "b"}
    a_events = await a.collect_until(3)
    assert all(e.data.get("input") != {"who": "b"} for e in a_events)
    assert a_events[0].data["input"] == {"n": 1}

    # A's client id still works for A: its next mutation is 2 (B's 1 did not count).
    more = await a.push([submit(2)])
    assert more.results[0].status == "applied", more
    # And over HTTP, B pushing with "shared" is B's own client (its mutation 2).
    r = await http_push(server, token("globex", "b"), "shared", [submit(2)])
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "applied", r.text

    # B claims an id first; A then uses the same id and is not locked out either.
    first_b = str(uuid.uuid4())
    r = await http_push(server, token("globex", "b"), "shared", [submit(3, first_b)])
    assert r.json()["results"][0]["status"] == "applied"
    later = await a.push([submit(3, first_b)])
    assert later.results[0].status == "applied", later
    await wait_for(lambda: _status(server, token("acme", "a"), first_b, "completed"), 20, 0.05)

    # A's cancel of its completed workflow answers for A's record (conflict: ended),
    # never touching B's; and a global admin must name the tenant of an ambiguous id.
    admin = auth(token("*", "root", "admin"))
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.get(f"/v1/workflows/{wf}", headers=admin)
        assert r.status_code == 400 and "tenant" in r.json()["error"]["message"], r.text
        r = await http.get(f"/v1/workflows/{wf}", params={"tenant": "globex"}, headers=admin)
        assert r.status_code == 200 and r.json()["id"] == wf
    await a.close()
    await b.close()


async def _status(server: RunningServer, tok: str, wf: str, status: str) -> bool:
    found = await workflow(server, tok, wf)
    return found is not None and found["status"] == status


# ----------------------------------------------------------------- finding 9


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/dlq/9223372036854775808/requeue", 404),
        ("POST", "/v1/dlq/99999999999999999999999999/requeue", 404),
        ("POST", "/v1/dlq/-1/requeue", 404),
        ("POST", "/v1/dlq/-9223372036854775809/requeue", 404),
        ("POST", "/v1/dlq/abc/requeue", 404),
        ("POST", "/v1/dlq/1e3/requeue", 404),
        ("POST", "/v1/dlq/%20/requeue", 404),
        ("GET", "/v1/pull?cursor=9223372036854775808", 400),
        ("GET", "/v1/pull?cursor=-1", 400),
        ("GET", "/v1/pull?cursor=x", 400),
        ("GET", "/v1/pull?limit=0", 400),
        ("GET", "/v1/pull?limit=99999999999999999999", 400),
        ("GET", "/v1/workflows?limit=-5", 400),
        ("GET", "/v1/workflows?limit=18446744073709551616", 400),
        ("GET", "/v1/dlq?status=bogus", 400),
        ("GET", "/v1/workflows/%00", 404),
        ("GET", "/v1/workflows/" + "9" * 400, 404),
    ],
)
async def test_out_of_range_ids_are_404_or_400_never_500(server, method, path, expected):
    """Finding 9: a huge dead-letter id answered 500 (OverflowError / storage error)."""
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.request(method, path, headers=auth(token("acme", "ops", "admin")))
    assert r.status_code == expected, (path, r.status_code, r.text)
    assert r.json()["error"]["code"] in ("not_found", "bad_message"), r.text


# ----------------------------------------------------------------- finding 10


async def test_a_mutation_id_repeated_in_one_batch_is_a_duplicate(server):
    """Finding 10: the second copy was ``rejected`` with a wrong "skips ahead" reason."""
    wf = str(uuid.uuid4())
    c = await RawClient.open(server.ws_url, tok=token("acme", "a"), client_id="dup")
    result = await c.push([submit(1, wf), submit(1, wf), submit(2), submit(2)])
    assert [r.status for r in result.results] == ["applied", "duplicate", "applied", "duplicate"]
    assert all(r.error is None for r in result.results), result
    found = await workflow(server, token("acme", "a"), wf)
    assert found is not None
    # Over HTTP too, and the workflow was submitted once.
    r = await http_push(server, token("acme", "a"), "dup", [submit(3), submit(3)])
    assert [x["status"] for x in r.json()["results"]] == ["applied", "duplicate"]
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.get("/v1/workflows", headers=auth(token("acme", "a")))
    assert len(r.json()["workflows"]) == 3
    await c.close()
