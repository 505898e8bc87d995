"""A client offline across a prune converges through a reset, on both backends.

Real server (uvicorn on a loopback port), real SDK clients with their SQLite files:

1. client A syncs five workflows to completion, then goes offline;
2. client B (same tenant) runs twenty more; the server prunes every event of ended
   workflows and the rows of A's five (ended before a cut);
3. A queues a submit while offline; B runs three more (their events are retained);
4. A reconnects: its cursor is below the tenant's horizon, so it gets a reset — the
   current snapshots (B's twenty, whose events are gone), its five stale views dropped,
   then every retained event above its cursor, with no gap — and its pending submit
   is pushed and applied. Its views equal the server's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from client_sdk.session import FetchSnapshots, SyncSession
from protocol import PROTOCOL_VERSION, Hello, Welcome, decode_server_message, encode
from sync_server.session import ServerSession
from sync_server.store import open_store
from tests.client_helpers import (
    fast_client,
    local_state,
    make_app,
    server_events,
    server_snapshots,
    wait_until,
)
from tests.servers import running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(120)


async def run_and_wait(client, n: int) -> list[str]:
    handles = [await client.submit_workflow("noop", {"i": i}) for i in range(n)]
    for handle in handles:
        await client.wait(handle.id, timeout=30)
    return [h.id for h in handles]


async def prune(url: str, events_before: float, rows_before: float) -> tuple[int, int]:
    store = open_store(url)
    await store.open()
    try:
        events = rows = 0
        while True:
            found, deleted = await store.prune_events(events_before, 7)
            events += deleted
            if found < 7:
                break
        while True:
            found, deleted = await store.prune_workflows(rows_before, 4, with_events=True)
            rows += found
            events += deleted
            if found < 4:
                break
        return events, rows
    finally:
        await store.close()


async def test_client_offline_across_a_prune_converges(database_url, tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="client_sdk")
    app = make_app(database_url)
    async with running(app) as server:
        a = fast_client(server.ws_url, tmp_path / "a.db")
        b = fast_client(server.ws_url, tmp_path / "b.db")
        horizons: list[int] = []
        a.on_reset(horizons.append)
        async with b:
            async with a:
                first = await run_and_wait(a, 5)
                await wait_until(
                    lambda: all(a.get_workflow(w).status == "completed" for w in first), 30
                )
                cursor_before = a.cursor
            cut = time.time()
            second = await run_and_wait(b, 20)
            events, rows = await prune(database_url, time.time() + 1, cut)
            assert rows == 5 and events > 20 * 2
            store = open_store(database_url)
            await store.open()
            try:
                horizon = await store.horizon("acme")
            finally:
                await store.close()
            assert horizon > cursor_before
            # The HTTP fallback carries the same horizon on every pull.
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                pulled = await http.get(
                    "/v1/pull",
                    params={"cursor": cursor_before},
                    headers={"authorization": f"Bearer {token('acme', 'client')}"},
                )
            assert pulled.status_code == 200 and pulled.json()["horizon"] == horizon
            # Offline: A queues a submit (it must survive the reset and be applied).
            offline = fast_client(server.ws_url, tmp_path / "a.db", connect=False)
            async with offline:
                queued = await offline.submit_workflow("noop", {"queued": True})
            third = await run_and_wait(b, 3)

            a = fast_client(server.ws_url, tmp_path / "a.db")
            a.on_reset(horizons.append)
            async with a:
                await a.flush(timeout=30)
                await a.wait(queued.id, timeout=30)

                async def converged() -> bool:
                    server_state = await server_snapshots(database_url)
                    return local_state(a) == server_state and a.pending_count == 0

                await wait_until(converged, 30, "A converges with the server")
                assert horizons == [horizon]
                assert a.resets == 1
                # B's twenty (events pruned) came from snapshots; A's five stale views
                # (rows pruned) are gone; the three newer and the queued one are there.
                ids = set(local_state(a))
                assert set(second) <= ids and set(third) <= ids and queued.id in ids
                assert not ids & set(first)
                # No gap in anything retained: every retained event above A's old
                # cursor was applied by A.
                retained = {e.seq for e in await server_events(database_url)}
                await wait_until(lambda: a.cursor >= max(retained), 30, "A reaches the head")
                applied = set(a._store.event_seqs())
                assert {s for s in retained if s > cursor_before} <= applied
        assert any("retention horizon" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------- the pure cores


def _welcome(head: int, horizon: int) -> Welcome:
    return Welcome(
        server_id="s",
        protocol_version=PROTOCOL_VERSION,
        last_mutation_id=0,
        head=head,
        horizon=horizon,
    )


def test_session_asks_for_one_reset_per_horizon():
    session = SyncSession("c", cursor=10)
    session.connection_made()
    session.receive_message(_welcome(head=500, horizon=200))
    assert [c for c in session.commands_to_run() if isinstance(c, FetchSnapshots)] == [
        FetchSnapshots(reset=True, horizon=200)
    ]
    assert session.counters.resets == 1
    # A reconnect before the cursor passed the horizon: the reset is not asked again.
    session.connection_lost()
    session.connection_made()
    session.receive_message(_welcome(head=500, horizon=200))
    assert not [c for c in session.commands_to_run() if isinstance(c, FetchSnapshots)]
    # A failed reset re-arms it, and forgets pages handed over since.
    session.received_cursor = 300
    session.reset_failed()
    assert session.received_cursor == session.cursor == 10
    session.connection_lost()
    session.connection_made()
    session.receive_message(_welcome(head=500, horizon=200))
    assert FetchSnapshots(reset=True, horizon=200) in session.commands_to_run()
    # A horizon at or below the cursor needs nothing (HTTP pulls report it on each page).
    session.receive_horizon(5)
    assert session.commands_to_run() == []


def test_session_without_horizon_keeps_progressive_sync():
    session = SyncSession("c", cursor=0, snapshot_threshold=100)
    session.connection_made()
    session.receive_message(_welcome(head=500, horizon=0))
    assert session.commands_to_run() == [FetchSnapshots()]


def test_server_welcome_carries_the_horizon():
    session = ServerSession(server_id="s")
    session.receive_message(
        Hello(client_id="c", protocol_version=PROTOCOL_VERSION, cursor=3, last_mutation_id=0)
    )
    session.receive_client_state(0, head=50, horizon=40)
    (welcome,) = [m for m in session.messages_to_send() if isinstance(m, Welcome)]
    assert welcome.horizon == 40 and welcome.head == 50
    # An old peer's Welcome (no horizon field) decodes with horizon 0.
    fields = {"server_id": "s", "protocol_version": PROTOCOL_VERSION, "last_mutation_id": 0}
    old = msgspec.msgpack.encode({"type": "Welcome", **fields, "head": 1})
    decoded = decode_server_message(old)
    assert isinstance(decoded, Welcome) and decoded.horizon == 0 and decoded.head == 1
    assert decode_server_message(encode(welcome)) == welcome
