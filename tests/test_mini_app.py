"""The mini-app backend example: instant answers offline, live progress relayed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from client_sdk.backoff import Backoff, CircuitBreaker
from examples.mini_app_backend import create_mini_app
from sync_server import create_app
from sync_server.saga.definitions import Step, Workflow
from tests.client_helpers import TENANT
from tests.conftest import scaled
from tests.servers import SECRET, RunningServer, free_port, running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(90)


async def render(ctx: Any) -> dict[str, Any]:
    for fraction in (0.25, 0.5, 0.75):
        await ctx.progress(fraction, f"{int(fraction * 100)}%")
    return {"url": f"https://img.example/{ctx.input['prompt']}.png"}


GENERATE = Workflow("generate_image", [Step("render", render)])


def mini_app(sync_port: int, path: Path) -> Any:
    return create_mini_app(
        f"ws://127.0.0.1:{sync_port}",
        token=token(TENANT, "mini"),
        path=str(path),
        backoff=Backoff(base=0.02, cap=0.2),
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.2),
    )


async def test_start_generation_answers_at_once_with_the_server_down(tmp_path: Path) -> None:
    sync_port = free_port()  # nothing listens there yet
    async with (
        running(mini_app(sync_port, tmp_path / "c.db")) as web,
        httpx.AsyncClient(base_url=web.http_url) as http,
    ):
        if True:
            started = time.perf_counter()
            r = await http.post("/start-generation", json={"prompt": "a cat"})
            assert time.perf_counter() - started < scaled(1.0)
            assert r.status_code == 202
            body = r.json()
            assert body["status"] == "pending" and body["pending"] is True
            got = await http.get(f"/generations/{body['id']}")
            assert got.status_code == 200 and got.json()["status"] == "pending"
            assert (await http.get("/generations/nope")).status_code == 404
            assert (await http.post("/start-generation", json={})).status_code == 400
            assert (await http.post("/start-generation", content=b"{")).status_code == 400
            bad_id = {"prompt": "x", "id": "not-a-uuid"}
            assert (await http.post("/start-generation", json=bad_id)).status_code == 400
            # The sync server comes up: the queued generation runs to completion.
            app = create_app(
                f"sqlite:///{tmp_path / 's.db'}", workflows=[GENERATE], auth_secret=SECRET
            )
            server = RunningServer(app, port=sync_port)
            await server.start()
            try:
                client = web.app.state.sync_client
                final = await client.wait(body["id"], timeout=scaled(30))
                assert final.status == "completed"
                done = (await http.get(f"/generations/{body['id']}")).json()
                assert done["status"] == "completed" and "cat" in done["result"]["url"]
            finally:
                await server.stop()


async def test_websocket_relays_progress_until_done(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 's.db'}", workflows=[GENERATE], auth_secret=SECRET)
    async with running(app) as sync, running(mini_app(sync.port, tmp_path / "c.db")) as web:
        async with httpx.AsyncClient(base_url=web.http_url) as http:
            body = (await http.post("/start-generation", json={"prompt": "dog"})).json()
        seen: list[dict[str, Any]] = []
        async with connect(f"ws://127.0.0.1:{web.port}/generations/{body['id']}/live") as ws:
            async for frame in ws:
                seen.append(json.loads(frame))
        assert seen[0]["status"] in ("pending", "running")
        assert seen[-1]["status"] == "completed" and not seen[-1]["pending"]
        assert any(v["status"] == "running" for v in seen)
        assert len(seen) >= 3
        async with connect(f"ws://127.0.0.1:{web.port}/generations/unknown/live") as ws:
            with pytest.raises(Exception):  # noqa: B017 - closed with 4404
                await ws.recv()
            assert ws.close_code == 4404
