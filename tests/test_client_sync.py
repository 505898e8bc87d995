"""The client SDK against the real server on loopback (issue 3, "What must be shown").

Every wait is on a condition with a deadline; faults are checked to have happened.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.server import serve

from client_sdk import SyncClient, SyncStopped, Unauthorized
from sync_server.auth import issue_token
from tests.client_helpers import (
    TENANT,
    fast_client,
    local_state,
    make_app,
    prefill_backlog,
    server_events,
    server_snapshots,
    server_submitted,
    wait_until,
)
from tests.conftest import scaled
from tests.faultproxy import FaultProxy
from tests.servers import RunningServer, free_port, running, server_process

pytestmark = pytest.mark.timeout(120)


async def converged(client: SyncClient, url: str) -> bool:
    server = await server_snapshots(url)
    return bool(server) and local_state(client) == server and client.pending_count == 0


async def test_offline_first_then_flush(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    port = free_port()
    async with fast_client(f"ws://127.0.0.1:{port}", tmp_path / "c.db") as client:
        handles = [await client.submit_workflow("noop", {"i": i}) for i in range(100)]
        assert client.pending_count == 100 and not client.connected
        views = [client.get_workflow(h.id) for h in handles]
        assert all(v is not None and v.status == "pending" and v.pending for v in views)
        server = RunningServer(make_app(url), port=port)
        await server.start()
        try:
            await client.flush(timeout=scaled(30))
            assert client.connected and client.pending_count == 0
            assert await server_submitted(url) == [h.id for h in handles]  # exactly, in order
            await wait_until(lambda: converged(client, url), 30, "views converge")
            done = await client.wait(handles[-1].id, timeout=scaled(30))
            assert done.status == "completed" and not done.pending
        finally:
            await client.close()
            await server.stop()


async def test_restart_and_network_cut_mid_sync(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    server = RunningServer(make_app(url))
    await server.start()
    port = server.port
    proxy = FaultProxy(("127.0.0.1", port), websocket=True)
    await proxy.start()
    client = fast_client(proxy.url("ws"), tmp_path / "c.db")
    await client.start()
    submitted: list[str] = []

    async def submitter() -> None:
        for i in range(150):
            submitted.append((await client.submit_workflow("noop", {"i": i})).id)
            await asyncio.sleep(0.005)  # paced load: the faults land mid-stream

    try:
        task = asyncio.create_task(submitter())
        await wait_until(lambda: len(submitted) >= 30 and client.connected, 30)
        assert proxy.reset_all() >= 1  # cut the network mid-sync
        await wait_until(lambda: len(submitted) >= 70, 30)
        await server.stop()  # server restart mid-sync (close 1012, then refused)
        await wait_until(lambda: not client.connected, 30)
        server = RunningServer(make_app(url), port=port)
        await server.start()
        await task
        await client.flush(timeout=scaled(60))
        await wait_until(lambda: converged(client, url), 60, "views converge after faults")
        assert client.connection is not None and client.connection.connects >= 3
        assert proxy.counters["resets"] >= 1
        ids = await server_submitted(url)
        assert sorted(ids) == sorted(submitted) and len(set(ids)) == len(ids)
        server_seqs = [e.seq for e in await server_events(url)]
        local = client.store.event_seqs()
        assert local == server_seqs[: len(local)]  # a gapless, duplicate-free prefix
        await wait_until(lambda: client.store.event_seqs() == server_seqs, 30)
        await wait_until(lambda: client.cursor == server_seqs[-1], 30)
    finally:
        await client.close()
        await proxy.stop()
        await server.stop()


async def test_rejection_rolls_back_with_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    async with (
        running(make_app(url)) as server,
        fast_client(server.ws_url, tmp_path / "c.db") as client,
    ):
        if True:
            changes: list[Any] = []
            client.on_change(changes.append)
            bad = await client.submit_workflow("no_such_workflow", {"x": 1})
            assert client.get_workflow(bad.id).status == "pending"
            good = await client.submit_workflow("noop", {})
            await client.flush(timeout=scaled(20))
            view = await client.wait(bad.id, timeout=scaled(10))
            assert view.status == "failed" and "unknown workflow" in (view.error or "")
            assert not view.pending and bad.id not in await server_snapshots(url)
            assert (await good.wait(timeout=scaled(30))).status == "completed"
            # Cancelling a finished workflow is refused: confirmed state stays, reason shown.
            await client.cancel_workflow(good.id)
            assert client.get_workflow(good.id).pending
            await client.flush(timeout=scaled(20))
            view = client.get_workflow(good.id)
            assert view.status == "completed" and "already" in (view.error or "")
            assert any(v.id == bad.id and v.status == "failed" for v in changes)
            assert client.store.mutations()[-1][3] == "rejected"


async def test_backlog_catch_up_bounded_memory(tmp_path: Path, caplog: Any) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    events, workflows = 100_000, 1000
    await prefill_backlog(url, events, workflows)
    proc_self = psutil.Process()
    with server_process(url) as (_proc, port):
        caplog.set_level(logging.INFO, logger="client_sdk")
        client = fast_client(f"ws://127.0.0.1:{port}", tmp_path / "c.db", connect=True)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc_self.memory_info().rss)
                stop.wait(0.005)

        baseline = proc_self.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        await client.start()
        try:
            await wait_until(lambda: len(client.list_workflows()) == workflows, 60)
            all_visible = time.perf_counter() - started
            await wait_until(lambda: client.cursor >= events, 110, "catch-up")
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            sampler.join()
            await client.close()
        growth_mb = (peak[0] - baseline) / 2**20
        rate = events / elapsed
        print(
            f"\nB4 catch-up: {events} events in {elapsed:.2f} s = {rate:.0f} events/s; "
            f"all {workflows} workflows visible after {all_visible:.2f} s; "
            f"peak RSS growth {growth_mb:.1f} MB"
        )
        assert any("progressive sync" in r.message for r in caplog.records)
        assert growth_mb <= 64, f"peak RSS grew by {growth_mb:.1f} MB"
        assert all_visible < elapsed  # newest state first, before the backlog is through
    reopened = SyncClient("ws://127.0.0.1:1", token="t", path=tmp_path / "c.db", connect=False)
    async with reopened:
        seqs = reopened.store.event_seqs()
        assert seqs == list(range(1, events + 1)) and reopened.cursor == events


def refuse_upgrades(app: Any) -> Any:
    """An ASGI wrapper standing in for a proxy that does not pass WebSockets."""

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await app(scope, receive, send)

    return wrapper


async def test_http_fallback_end_to_end(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="client_sdk")
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    async with running(refuse_upgrades(make_app(url))) as server:
        client = fast_client(server.ws_url, tmp_path / "c.db", http_poll_interval=0.05)
        async with client:
            handles = [await client.submit_workflow("noop", {"i": i}) for i in range(20)]
            bad = await client.submit_workflow("nope", {})
            await client.flush(timeout=scaled(30))
            assert client.transport == "http"
            for h in handles:
                assert (await h.wait(timeout=scaled(30))).status == "completed"
            assert client.get_workflow(bad.id).status == "failed"
            await wait_until(lambda: converged(client, url), 30)
            assert client.connection is not None and client.connection.refused_upgrades >= 2
    assert any("falling back to HTTP" in r.message for r in caplog.records)
    assert sorted(await server_submitted(url)) == sorted(h.id for h in handles)


async def test_bad_token_stops_without_spinning(tmp_path: Path, caplog: Any) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    bad = issue_token("wrong-secret-0123456789abcdef0123456789", tenant=TENANT, subject="c")
    async with (
        running(make_app(url)) as server,
        fast_client(server.ws_url, tmp_path / "c.db", token=bad) as client,
    ):
        if True:
            await client.submit_workflow("noop", {})
            with pytest.raises(SyncStopped) as info:
                await client.flush(timeout=scaled(20))
            assert isinstance(info.value.cause, Unauthorized)
            assert client.connection is not None and client.connection.connects == 1
            assert client.pending_count == 1  # kept for a restart with a good token
            assert isinstance(client.last_error, Unauthorized)


async def test_garbage_and_stalling_servers_reconnect(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="client_sdk")
    mode = {"value": "garbage"}
    connections = {"count": 0}

    async def handler(ws: Any) -> None:
        connections["count"] += 1
        await ws.recv()  # Hello
        if mode["value"] == "garbage":
            await ws.send(b"\xc1\xff not msgpack")
        await ws.wait_closed()  # the stalling server never answers

    async with serve(handler, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        client = fast_client(f"ws://127.0.0.1:{port}", tmp_path / "c.db", stall_timeout=0.3)
        async with client:
            await wait_until(lambda: connections["count"] >= 3, 20, "reconnects after garbage")
            assert any("bad frame" in r.message for r in caplog.records)
            mode["value"] = "stall"
            seen = connections["count"]
            await wait_until(lambda: connections["count"] >= seen + 2, 20, "reconnects")
            assert any("stalled" in r.message for r in caplog.records)
            assert not client.connected and client.session.state != "failed"


async def test_flush_waits_for_results_to_be_durable(tmp_path: Path, monkeypatch: Any) -> None:
    """flush() returns only when every verdict is in the file, even if the applier is
    still busy with an earlier page when the PushResult arrives (a wake-up in that gap,
    such as live progress or a reconnect, once let flush return with rows pending)."""
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    async with (
        running(make_app(url)) as server,
        fast_client(server.ws_url, tmp_path / "a.db") as client,
        fast_client(server.ws_url, tmp_path / "b.db") as other,
    ):
        await wait_until(lambda: client.connected, 20, "client connected")
        gate = asyncio.Event()
        blocked = asyncio.Event()
        apply = client.store.apply_events

        async def slow_apply(events: Any, cursor: int) -> set[str]:
            blocked.set()
            await gate.wait()
            return await apply(events, cursor)

        monkeypatch.setattr(client.store, "apply_events", slow_apply)
        # Another client's workflow sends a page: the applier blocks on it.
        await other.submit_workflow("noop")
        await asyncio.wait_for(blocked.wait(), scaled(20))
        # Our submit's PushResult arrives; its Settle queues behind that page.
        await client.submit_workflow("noop")
        await wait_until(lambda: client.session.pending_count == 0, 20, "push answered")
        assert client.store.pending_count() == 1  # the verdict is not in the file yet

        async def flush_then_count() -> int:
            await client.flush(timeout=scaled(20))
            return client.store.pending_count()

        flushing = asyncio.create_task(flush_then_count())
        client.state_changed()  # a wake-up in the gap (progress, reconnect, ...)
        for _ in range(20):
            await asyncio.sleep(0)  # let the woken flush run; no time passes
        assert not flushing.done(), "flush returned before the verdict was durable"
        gate.set()
        assert await flushing == 0
        assert client.pending_count == 0


async def test_second_client_on_the_same_file_is_refused(tmp_path: Path) -> None:
    from client_sdk import LocalStoreError

    async with fast_client("ws://127.0.0.1:1", tmp_path / "c.db", connect=False):
        with pytest.raises(LocalStoreError, match="in use"):
            await fast_client("ws://127.0.0.1:1", tmp_path / "c.db").start()


def test_exported_names() -> None:
    import client_sdk

    assert sorted(client_sdk.__all__) == sorted(
        [
            "SyncClient",
            "WorkflowHandle",
            "WorkflowView",
            "StepView",
            "ClientClosed",
            "Forbidden",
            "LocalStoreError",
            "ProtocolError",
            "RateLimited",
            "SyncStopped",
            "TetherError",
            "Unauthorized",
            "ValidationError",
        ]
    )
    assert all(hasattr(client_sdk, name) for name in client_sdk.__all__)


async def test_client_api_offline(tmp_path: Path) -> None:
    from client_sdk import ClientClosed, ValidationError

    client = fast_client("ws://127.0.0.1:1", tmp_path / "c.db", connect=False)
    with pytest.raises(ClientClosed):
        await client.submit_workflow("noop", {})
    async with client:
        with pytest.raises(ValidationError):
            await client.submit_workflow("noop", {}, workflow_id="not-a-uuid")
        with pytest.raises(ValidationError):
            await client.cancel_workflow("nope")
        h = await client.submit_workflow("noop", {"a": 1})
        assert (await client.submit_workflow("noop", {}, workflow_id=h.id)) == h
        assert client.pending_count == 1 and client.oldest_pending_age >= 0
        assert [v.id for v in client.list_workflows(status="pending")] == [h.id]
        assert client.list_workflows(status="running") == []
        assert client.transport is None and not client.connected
        with pytest.raises(TimeoutError):
            await client.flush(timeout=0.05)
        with pytest.raises(TimeoutError):
            await h.wait(timeout=0.05)
