"""Crash safety: a client process SIGKILLed at random moments, again and again.

The child submits workflows continuously against a real server (pushes and live event
pages flow meanwhile) and is killed mid-submit, mid-push or mid-apply. After the last
restart and ``flush``: every workflow whose ``submit_workflow`` returned is on the
server exactly once, and the client's event log is gapless and duplicate-free.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from client_sdk.localstore import LocalStore
from tests.client_helpers import TENANT, make_app, server_events, server_submitted
from tests.conftest import scaled
from tests.servers import running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(180)

CHILD = str(Path(__file__).with_name("client_crash_child.py"))
ROOT = str(Path(__file__).parent.parent)


async def spawn(url: str, path: Path, mode: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        CHILD,
        url,
        token(TENANT, "crash"),
        str(path),
        mode,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), scaled(timeout))
    return line.decode().strip()


async def test_sigkill_again_and_again(tmp_path: Path) -> None:
    seed = int(os.environ.get("TETHER_CHAOS_SEED", "7"))
    rng = random.Random(seed)
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    path = tmp_path / "client.db"
    returned: list[str] = []
    killed_with_pending = 0
    cursors: list[int] = []
    async with running(make_app(url)) as server:
        for _round in range(8):
            proc = await spawn(server.ws_url, path, "submit")
            started = await read_line(proc, 30)
            assert started.startswith("STARTED"), started
            cursors.append(int(started.split()[1]))
            # Kill after a random number of returned submits (0 = during start-up).
            target = rng.choice([0, 1, 5, 20, 60, 120])
            last = ""
            for _ in range(target):
                last = await read_line(proc, 30)
                assert last.startswith("RET"), last
                returned.append(last.split()[1])
            if target == 0:
                await asyncio.sleep(rng.uniform(0, 0.05))  # kill mid-connect/mid-apply
            proc.send_signal(signal.SIGKILL)
            # Lines printed before the kill landed are submits that returned too.
            assert proc.stdout is not None
            rest = (await proc.stdout.read()).decode().split("\n")
            await proc.wait()
            for line in rest:
                if line.startswith("RET"):
                    returned.append(line.split()[1])
                    last = line
            if last and int(last.split()[2]) > 0:
                killed_with_pending += 1
        proc = await spawn(server.ws_url, path, "flush")
        assert (await read_line(proc, 30)).startswith("STARTED")
        flushed = await read_line(proc, 90)
        assert flushed.startswith("FLUSHED"), flushed
        await proc.wait()
        on_server = await server_submitted(url)
        seqs = [e.seq for e in await server_events(url)]
    assert len(returned) > 50
    assert killed_with_pending >= 1  # some kills landed with pushes outstanding
    assert max(cursors) > 0  # and some after pages had been applied
    assert len(on_server) == len(set(on_server)), "a workflow was applied twice"
    missing = set(returned) - set(on_server)
    assert not missing, f"{len(missing)} returned submits lost"
    store = LocalStore(path)
    opened = store.open()
    try:
        local = store.event_seqs()
        assert len(local) == len(set(local))
        assert local == [s for s in seqs if s <= opened.cursor], "gap or duplicate in event log"
        assert opened.pending == []
        ids = [m[0] for m in store.mutations()]
        assert ids == sorted(ids)
    finally:
        store.close()
