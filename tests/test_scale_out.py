"""Several instances over one PostgreSQL: cross-instance fan-out, a lost notification
link, and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import asyncpg
import pytest

from protocol import Events
from sync_server import create_app
from tests.conftest import PG_DSN, wait_for
from tests.servers import SECRET, running, server_process
from tests.sync_helpers import NOOP, RawClient, close_code_of, submit

pytestmark = pytest.mark.timeout(120)


def make_app(url: str, **settings):
    return create_app(url, workflows=[NOOP], auth_secret=SECRET, run_sagas=False, **settings)


async def test_event_written_on_a_reaches_client_on_b(pg_url):
    async with running(make_app(pg_url)) as a, running(make_app(pg_url)) as b:
        reader = await RawClient.open(b.ws_url, client_id="reader")
        await reader.collect_until(0)
        writer = await RawClient.open(a.ws_url, client_id="writer")
        latencies = []
        for i in range(1, 41):
            started = time.perf_counter()
            await writer.push([submit(i)])
            await reader.collect_until(i)
            latencies.append(time.perf_counter() - started)
        seqs = [e.seq for e in reader.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 40
        p50 = statistics.median(latencies) * 1000
        p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000
        print(f"push on A -> delivered on B: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        await reader.close()
        await writer.close()


async def test_lost_listener_connection_loses_nothing(pg_url):
    async with running(make_app(pg_url)) as a, running(make_app(pg_url)) as b:
        reader = await RawClient.open(b.ws_url, client_id="reader")
        writer = await RawClient.open(a.ws_url, client_id="writer")
        await writer.push([submit(1)])
        await reader.collect_until(1)
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
        # Written while B's listener may be down: its notifications are gone for good.
        await writer.push([submit(i) for i in range(2, 12)])
        await asyncio.wait_for(reconnected.wait(), 30)
        events = await reader.collect_until(11, timeout=30)
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        await reader.close()
        await writer.close()


def test_sigterm_drains_clients_with_1012(pg_url):
    async def scenario(port: int) -> tuple[int | None, int]:
        client = await RawClient.open(f"ws://127.0.0.1:{port}", client_id="c")
        await client.push([submit(1)])
        await client.collect_until(1)
        proc.send_signal(signal.SIGTERM)
        code = await close_code_of(client.ws, timeout=20)
        return code, client.cursor

    with server_process(pg_url, workflows="tests.sync_helpers:NOOP") as (proc, port):
        code, cursor = asyncio.run(scenario(port))
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM, not a crash.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert code == 1012
    assert cursor > 0


async def test_connection_cap_answers_1013(pg_url):
    async with running(make_app(pg_url, max_connections=2)) as srv:
        a = await RawClient.open(srv.ws_url, client_id="a")
        b = await RawClient.open(srv.ws_url, client_id="b")
        from websockets.asyncio.client import connect

        from tests.sync_helpers import token

        async with connect(
            f"{srv.ws_url}/v1/sync", additional_headers={"Authorization": f"Bearer {token()}"}
        ) as ws:
            assert await close_code_of(ws) == 1013
        await a.close()
        await wait_for(lambda: srv.app.state.tether.connections == 1)
        c = await RawClient.open(srv.ws_url, client_id="c")  # room again
        assert c.welcome is not None
        await b.close()
        await c.close()


async def test_progress_on_a_reaches_client_on_b_coalesced(pg_url):
    from protocol import Progress

    async with running(make_app(pg_url)) as a, running(make_app(pg_url)) as b:
        reader = await RawClient.open(b.ws_url, client_id="reader")
        caught_up = await reader.recv()  # the (empty) first page: the session is live now
        assert isinstance(caught_up, Events) and not caught_up.has_more
        hub = a.app.state.tether.hub
        # A step reporting in a tight loop: the last value must arrive, not every one.
        for i in range(1, 1001):
            hub.publish_progress(
                "acme", Progress(workflow_id="w", step="render", fraction=i / 1000)
            )
        hub.publish_progress("globex", Progress(workflow_id="x", step="s", fraction=0.5))
        seen = []
        async with asyncio.timeout(10):
            while not seen or seen[-1].fraction < 1.0:
                message = await reader.recv()
                if isinstance(message, Progress):
                    seen.append(message)
        assert seen[-1].fraction == 1.0
        assert len(seen) < 100  # coalesced across instances
        assert all(p.workflow_id == "w" for p in seen)  # other tenants' progress stays out
        await reader.close()
