"""The emp-job-queue double behaves as the real queue was observed to (issue 14).

Each test talks to the double over real sockets (httpx, websockets) and checks one of
the queue's documented quirks, so the adapter's tests rest on a faithful double.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import wait_for
from tests.emp_queue_double import CANCELLED, running_emp_queue


@pytest.fixture
def queue():
    with running_emp_queue() as server:
        yield server


def ws_url(queue: Any, client: str = "c1", token: str | None = None) -> str:
    query = f"?token={token}" if token else ""
    return f"ws://127.0.0.1:{queue.port}/ws/client/{client}{query}"


def submit(job_id: str | None, **fields: Any) -> str:
    message = {"type": "submit_job", "service_required": "comfyui", "payload": {}, **fields}
    if job_id is not None:
        message["message_id"] = job_id
    return json.dumps(message)


async def events(conn: ClientConnection, until: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Messages received until one of type ``until`` (inclusive)."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            out.append(json.loads(await conn.recv()))
            if out[-1]["type"] == until:
                return out


async def status(queue: Any, job_id: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"{queue.url}/api/jobs/{job_id}")


async def test_message_id_is_the_job_id_success_comes_twice_and_status_has_no_result(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(
            submit("job-1", payload={"duration": 0.1, "prompt": "cat"}, workflow_id="w1")
        )
        got = await events(conn, "complete_job")
        got.append(json.loads(await asyncio.wait_for(conn.recv(), 5)))
    progress = [e["progress"] for e in got if e["type"] == "update_job_progress"]
    assert progress and progress[-1] == 100 and all(0 <= p <= 100 for p in progress)
    done = [e for e in got if e["type"] == "complete_job"]
    assert len(done) == 2  # two completions, of two different shapes
    assert done[0]["result"]["status"] == "success" and "success" not in done[0]["result"]
    assert done[1]["result"]["success"] is True and "status" not in done[1]["result"]
    assert done[0]["result"]["data"] == done[1]["result"]["data"]
    assert done[0]["result"]["data"]["echo"] == "cat"
    body = (await status(queue, "job-1")).json()
    assert body["success"] and body["job"]["status"] == "completed"
    assert "result" not in body["job"] and "error" not in body["job"]
    assert body["job"]["started_at"] and body["job"]["max_retries"] == 3  # absent -> 3
    async with httpx.AsyncClient() as http:
        att = (await http.get(f"{queue.url}/api/attestations", params={"workflow_id": "w1"})).json()
    assert att["attestations"][0]["job_id"] == "job-1"
    assert att["attestations"][0]["result"]["data"]["echo"] == "cat"
    assert (await status(queue, "nope")).status_code == 404


async def test_without_message_id_the_queue_names_the_job_and_post_assigns_its_own(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit(None, payload={"duration": 0.05}))
        first = json.loads(await asyncio.wait_for(conn.recv(), 5))
    assert len(first["job_id"]) == 36
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{queue.url}/api/jobs",
            json={"message_id": "mine", "service_required": "x", "payload": {}},
        )
    assert response.status_code == 201
    assert response.json()["job_id"] != "mine"
    assert (await status(queue, "mine")).status_code == 404


async def test_failure_is_failed_completion_then_job_failed_after_silent_retries(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("f1", payload={"fail": True, "duration": 0.05}, max_retries=0))
        got = await events(conn, "job_failed")
    kinds = [e["type"] for e in got if e["type"] != "update_job_progress"]
    assert kinds == ["complete_job", "job_failed"]  # nothing for the internal retries
    assert got[-2]["result"]["status"] == "failed"
    assert queue.books.starts["f1"] == 3  # max_retries 0 means 3 attempts
    job = (await status(queue, "f1")).json()["job"]
    assert job["status"] == "failed" and job["retry_count"] == 2


async def test_max_retries_one_is_a_single_attempt(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("f2", payload={"fail": True, "duration": 0.05}, max_retries=1))
        await events(conn, "job_failed")
    assert queue.books.starts["f2"] == 1


async def test_resubmitting_an_id_runs_it_again_even_concurrently(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("dup", payload={"duration": 0.05}))
        await wait_for(lambda: queue.books.completions["dup"] == 1, 5)
        await conn.send(submit("dup", payload={"duration": 0.05}))  # completed: runs again
        await wait_for(lambda: queue.books.completions["dup"] == 2, 5)
        assert queue.books.starts["dup"] == 2
        await conn.send(submit("twice", payload={"duration": 0.5}))
        await wait_for(lambda: queue.books.starts["twice"] == 1, 5)
        await conn.send(submit("twice", payload={"duration": 0.5}))  # still running
        await wait_for(lambda: queue.books.starts["twice"] == 2, 5)
        job = queue.job("twice")
        assert job is not None and job["status"] == "in_progress"


async def test_events_go_only_to_the_submitting_connection_and_are_not_replayed(queue):
    async with connect(ws_url(queue, "a")) as a, connect(ws_url(queue, "b")) as b:
        await a.send(submit("only-a", payload={"duration": 0.05}))
        await events(a, "complete_job")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.recv(), 0.3)
        await b.send(json.dumps({"type": "subscribe_progress", "job_id": "only-a"}))
        assert json.loads(await asyncio.wait_for(b.recv(), 5))["type"] == "subscribed"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.recv(), 0.3)
    async with connect(ws_url(queue, "a")) as again:  # a reconnecting client gets nothing
        await again.send(submit("later", payload={"duration": 0.05}))
        got = await events(again, "complete_job")
    assert all(e["job_id"] == "later" for e in got)


async def test_api_restart_drops_subscriptions_so_events_are_lost(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("r1", payload={"duration": 0.6}))
        await wait_for(lambda: queue.books.starts["r1"] == 1, 5)
        await asyncio.to_thread(queue.restart_api, 0.1)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(conn.recv(), 5)
    await wait_for(lambda: not queue.queue.down, 5)
    async with connect(ws_url(queue)) as conn:
        await wait_for(lambda: (queue.job("r1") or {}).get("status") == "completed", 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.recv(), 0.3)
    assert queue.books.events_lost > 0 and queue.books.restarts == 1


async def test_dead_worker_leaves_the_job_in_progress_and_sigterm_fails_it(queue):
    await asyncio.to_thread(queue.kill_workers, 1)
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("dead", payload={"duration": 0.05}))
        await wait_for(lambda: queue.books.starts["dead"] == 1, 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.recv(), 0.5)
        assert queue.job("dead")["status"] == "in_progress"
        await asyncio.to_thread(queue.term_workers, 1)
        await conn.send(submit("term", payload={"duration": 0.05}))
        got = await events(conn, "job_failed")
    assert "SIGTERM" in got[-1]["error"] and queue.job("term")["status"] == "failed"


async def test_cancel_writes_failed_and_sends_the_failure_events(queue):
    async with connect(ws_url(queue)) as conn:
        await conn.send(submit("c1", payload={"duration": 5}))
        await wait_for(lambda: queue.books.starts["c1"] == 1, 5)
        await conn.send(json.dumps({"type": "cancel_job", "job_id": "c1"}))
        got = await events(conn, "job_failed")
        assert got[-1]["error"] == CANCELLED and got[-2]["result"]["status"] == "failed"
        assert queue.job("c1")["status"] == "failed"
        await conn.send(submit("c2", payload={"duration": 0.05}))
        await events(conn, "complete_job")
        await conn.send(json.dumps({"type": "cancel_job", "job_id": "c2"}))
        await wait_for(lambda: queue.books.cancels["c2"] == 1, 5)
    assert queue.job("c2")["status"] == "completed"  # a completed job cannot be cancelled


async def test_a_bad_token_is_closed_with_1008():
    with running_emp_queue(token="secret") as queue:
        async with connect(ws_url(queue, token="wrong")) as conn:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        async with connect(ws_url(queue, token="secret")) as conn:
            await conn.send(submit("ok", payload={"duration": 0.05}))
            await events(conn, "complete_job")
