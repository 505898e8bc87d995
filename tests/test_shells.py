"""HTTP is a second shell over the same session core as the WebSocket (issue 12): the
same push and pull give the same answers on both — results and their codes, pages cut
by count and bytes, NUL refusal, another tenant's ids, duplicates — and the shells
depend on the services Protocol, never on ``sync_server.app``."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from protocol import PROTOCOL_VERSION, Ack, Error, Events, Hello, Mutation, encode
from sync_server import create_app
from tests.servers import SECRET, running
from tests.sync_helpers import NOOP, RawClient, close_code_of, token

pytestmark = pytest.mark.timeout(90)

WF = "6f1c1a52-8d5e-4c39-9a57-0c2b0f6d7a01"
OTHER = "0a3a4a6f-2d0c-4f4e-8a0e-5d2b9c1e7f02"
PAD = "x" * 1000
PAGE_BYTES = 3000
"""Each event carries ~1 KB of input: two fit a page whether sized as msgpack or JSON,
three do not — so both shells must cut pages of two."""

Result = tuple[int, str, str | None, str | None]


def submit(mid: int, workflow_id: str, pad: str = "") -> Mutation:
    return Mutation(
        id=mid,
        name="submit_workflow",
        args={"workflow_id": workflow_id, "name": "noop", "input": {"pad": pad}},
        created_at=1.0,
    )


class WsShell:
    name = "ws"

    def __init__(self, url: str) -> None:
        self.url = url
        self.clients: dict[tuple[str, str], RawClient] = {}

    async def push(self, tok: str, client_id: str, mutations: list[Mutation]) -> list[Result]:
        key = (tok, client_id)
        if key not in self.clients:
            self.clients[key] = await RawClient.open(self.url, tok=tok, client_id=client_id)
        answer = await self.clients[key].push(mutations)
        return [
            (r.id, r.status, r.error, None if r.code is msgspec.UNSET else r.code)
            for r in answer.results
        ]

    async def pages(self, tok: str) -> list[list[int]]:
        reader = await RawClient.open(self.url, tok=tok, client_id="reader", hello=False)
        hello = Hello(client_id="reader", protocol_version=PROTOCOL_VERSION)
        await reader.ws.send(encode(hello))
        pages: list[list[int]] = []
        async with asyncio.timeout(20):
            while True:
                message = await reader.recv()
                if isinstance(message, Events):
                    if message.events:
                        pages.append([e.seq for e in message.events])
                        await reader.ws.send(encode(Ack(cursor=message.cursor)))
                    if not message.has_more:
                        break
        await reader.close()
        return pages

    async def refusal(self, tok: str, client_id: str) -> str:
        """The message of the error that refuses ``client_id`` (the session closes)."""
        client = await RawClient.open(self.url, tok=tok, client_id=client_id, hello=False)
        await client.ws.send(encode(Hello(client_id=client_id, protocol_version=PROTOCOL_VERSION)))
        error = await client.recv()
        assert isinstance(error, Error), error
        assert await close_code_of(client.ws) == 4400
        return error.message

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


class HttpShell:
    name = "http"

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url)

    async def push(self, tok: str, client_id: str, mutations: list[Mutation]) -> list[Result]:
        body = {"client_id": client_id, "mutations": msgspec.to_builtins(mutations)}
        r = await self.http.post("/v1/push", json=body, headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 200, r.text
        return [(x["id"], x["status"], x["error"], x.get("code")) for x in r.json()["results"]]

    async def pages(self, tok: str) -> list[list[int]]:
        pages: list[list[int]] = []
        cursor = 0
        while True:
            r = await self.http.get(
                "/v1/pull", params={"cursor": cursor}, headers={"Authorization": f"Bearer {tok}"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            if body["events"]:
                pages.append([e["seq"] for e in body["events"]])
            cursor = body["cursor"]
            if not body["has_more"]:
                return pages

    async def refusal(self, tok: str, client_id: str) -> str:
        body = {"client_id": client_id, "mutations": [msgspec.to_builtins(submit(1, WF))]}
        r = await self.http.post("/v1/push", json=body, headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 422, r.text
        message: str = r.json()["error"]["message"]
        return message

    async def close(self) -> None:
        await self.http.aclose()


@pytest.fixture(params=["ws", "http"])
async def shell(request: pytest.FixtureRequest, database_url: str) -> Any:
    app = create_app(
        database_url, workflows=[NOOP], auth_secret=SECRET, run_sagas=False, page_bytes=PAGE_BYTES
    )
    async with running(app) as srv:
        shell = WsShell(srv.ws_url) if request.param == "ws" else HttpShell(srv.http_url)
        try:
            yield shell
        finally:
            await shell.close()


async def test_push_answers_alike_on_both_shells(shell: Any) -> None:
    acme, other = token("acme", "c1"), token("globex", "c1")
    nul = Mutation(
        id=2,
        name="submit_workflow",
        args={"workflow_id": OTHER, "name": "noop", "input": {"a\x00": 1}},
    )
    first = await shell.push(acme, "c1", [submit(1, WF), nul, submit(4, OTHER)])
    gap = (
        "conflict: mutation id 4 skips ahead of the last applied id 2; "
        "nothing after the gap was applied"
    )
    assert first[0] == (1, "applied", None, None)
    assert first[1][:2] == (2, "rejected") and "NUL" in (first[1][2] or "")
    assert first[1][3] == "invalid"
    assert first[2] == (4, "rejected", gap, "gap")
    # A duplicate repeats the original outcome (its text; the code is not stored).
    again = await shell.push(acme, "c1", [submit(1, WF), nul])
    assert again == [(1, "duplicate", None, None), (2, "duplicate", first[1][2], None)]
    # Another tenant: its own client "c1" (id 1 is new there), and acme's workflow id
    # names nothing for it.
    cancel = Mutation(id=2, name="cancel_workflow", args={"workflow_id": WF})
    theirs = await shell.push(other, "c1", [submit(1, OTHER), cancel])
    assert theirs == [(1, "applied", None, None), (2, "rejected", f"no workflow {WF}", "not_found")]


async def test_a_nul_in_the_client_id_is_refused_alike_on_both_shells(shell: Any) -> None:
    """The same rule and text; the WebSocket closes 4400 (a bad Hello), HTTP answers 422."""
    message = await shell.refusal(token("acme", "c1"), "a\x00b")
    assert message == "client_id contains a NUL character (U+0000)"


async def test_pages_cut_alike_on_both_shells(shell: Any) -> None:
    acme = token("acme", "c1")
    mutations = [submit(i, f"6f1c1a52-8d5e-4c39-9a57-0c2b0f6d7a{i:02d}", PAD) for i in range(1, 8)]
    results = await shell.push(acme, "c1", mutations)
    assert [r[1] for r in results] == ["applied"] * 7
    await shell.push(token("globex", "c1"), "c1", [submit(1, OTHER, PAD)])  # not acme's
    pages = await shell.pages(acme)
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    seqs = [seq for page in pages for seq in page]
    assert seqs == sorted(seqs) and len(seqs) == 7


async def test_one_event_over_the_budget_travels_alone_on_both_shells(shell: Any) -> None:
    acme = token("acme", "c1")
    big = "y" * (PAGE_BYTES * 2)
    await shell.push(acme, "c1", [submit(1, WF, big), submit(2, OTHER)])
    assert [len(page) for page in await shell.pages(acme)] == [1, 1]


SHELLS = ("ws.py", "http_api.py", "dashboard.py", "flags/http.py", "sync_core.py")


@pytest.mark.parametrize("module", SHELLS)
def test_shells_do_not_import_the_app(module: str) -> None:
    """A shell sees the instance through ``sync_server.services.Services`` only."""
    source = Path(__file__).parent.parent / "sync_server" / module
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if name.startswith("sync_server.app")}, imported
    assert "Tether" not in {name.rsplit(".", 1)[-1] for name in imported}


def test_the_app_satisfies_the_services_protocol() -> None:
    from sync_server.app import Tether
    from sync_server.services import Services

    wanted = {name for name in dir(Services) if not name.startswith("_")}
    missing = {name for name in wanted if not hasattr(Tether, name)}
    # Instance attributes are set in __init__: read them from its source.
    source = ast.parse(Path(__file__).parent.parent.joinpath("sync_server/app.py").read_text())
    assigned = {
        node.attr
        for node in ast.walk(source)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    assert missing <= assigned, missing - assigned


def test_importing_the_shells_does_not_load_the_app() -> None:
    """The same, as a fresh interpreter sees it (``sys.modules`` after the imports)."""
    code = (
        "import sys\n"
        + "".join(f"import sync_server.{m[:-3].replace('/', '.')}\n" for m in SHELLS)
        + "print('sync_server.app' in sys.modules)\n"
    )
    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
