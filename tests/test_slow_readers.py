"""Server memory under slow readers (issue 11, finding 5), on a real server process.

Three connections say ``Hello`` and then read nothing while the tenant's traffic
carries large reports. Before byte budgets each connection queued up to 1,000 frames,
each its own encoded copy, and the server's RSS grew by ~100 MiB. Now a connection's
queue is bounded in bytes (``send_queue_bytes``): the slow readers are cut with 1013,
and the server's RSS stays flat. The test prints the growth it measured.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import httpx
import msgspec
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect

from protocol import PROTOCOL_VERSION, Hello, Mutation, encode
from protocol.limits import SEND_QUEUE_BYTES
from tests.servers import server_process
from tests.sync_helpers import submit, token

pytestmark = pytest.mark.timeout(240)

REPORTS = 1500
DETAIL = 15_000  # under MAX_DETAIL_BYTES: accepted before and after the fix
GROWTH_LIMIT = 32 * 1024 * 1024


async def _slow_reader(port: int, name: str) -> ClientConnection:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    ws = await connect(
        f"ws://127.0.0.1:{port}/v1/sync",
        sock=sock,
        max_queue=1,
        max_size=None,
        additional_headers={"Authorization": f"Bearer {token(subject=name)}"},
    )
    await ws.send(encode(Hello(client_id=name, protocol_version=PROTOCOL_VERSION)))
    return ws


async def test_slow_readers_do_not_grow_server_memory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    with server_process(url, workflows="tests.sync_helpers:NOOP") as (proc, port):
        server = psutil.Process(proc.pid)
        headers = {"Authorization": f"Bearer {token(subject='writer')}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
        ) as http:

            async def push(mutations: list[Mutation]) -> list[str]:
                body = {"client_id": "w", "mutations": [msgspec.to_builtins(m) for m in mutations]}
                r = await http.post("/v1/push", json=body)
                assert r.status_code == 200, r.text
                return [x["status"] for x in r.json()["results"]]

            wf = str(uuid.uuid4())
            assert await push([submit(1, wf)]) == ["applied"]
            for _ in range(200):  # the noop workflow completes; reports then agree with it
                if (await http.get(f"/v1/workflows/{wf}")).json()["status"] == "completed":
                    break
            readers = [await _slow_reader(port, f"slow-{i}") for i in range(3)]
            base = server.memory_info().rss
            peak = base
            mid = 1
            for start in range(0, REPORTS, 10):
                batch = []
                for k in range(10):
                    mid += 1
                    args = {
                        "workflow_id": wf,
                        "source": "mini-app",
                        "status": "completed",
                        "at": float(start + k + 1),
                        "detail": {"blob": "d" * DETAIL},
                    }
                    batch.append(Mutation(id=mid, name="report_state", args=args))
                assert await push(batch) == ["applied"] * 10
                peak = max(peak, server.memory_info().rss)
            for ws in readers:
                await ws.close()
    growth = peak - base
    print(
        f"\nslow readers: server RSS {base / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB "
        f"(+{growth / 2**20:.1f} MiB) with 3 slow readers, {REPORTS} reports of {DETAIL} B; "
        f"send queue budget {SEND_QUEUE_BYTES / 2**20:.0f} MiB per connection"
    )
    assert growth < GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.1f} MiB"
