"""The scenario of issue 14: Tether in front of emp-job-queue, while everything fails.

Three ``sync-server serve --workflows examples.emp_pipeline:workflows --sources
examples.emp_pipeline:sources`` processes share one PostgreSQL database and the queue
double (``tests/emp_queue_double.py``, real sockets). A real ``SyncClient`` submits
multi-step generations (three queue jobs each). Meanwhile: two Tether instances are
SIGKILLed while they hold running steps (and restarted on the same port; the client
reconnects when it was its instance), the queue's WebSocket
connections are cut, the queue's API restarts (every subscription lost) and a worker
dies mid-job (its job stays ``in_progress`` forever).

Checked: every workflow completes; no queue job id ever started twice; progress reached
the client; every result is the right worker output for the right step; and each fault
really happened ("sometimes" assertions).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sync_server.store import open_store
from tests.client_helpers import fast_client
from tests.conftest import wait_for
from tests.emp_queue_double import running_emp_queue
from tests.servers import SECRET, free_port, wait_http

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = 6


class Instance:
    """One ``sync-server serve`` process of the example pipeline."""

    def __init__(
        self, tmp: Path, name: str, database: str, queue_url: str, port: int | None = None
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.log_path = tmp / f"{name}.log"
        self._log = self.log_path.open("ab")
        env = {
            **os.environ,
            "SYNC_AUTH_SECRET": SECRET,
            "EMP_JOB_QUEUE_URL": queue_url,
            "EMP_STUCK_AFTER": "2",
            "PYTHONUNBUFFERED": "1",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "sync_server.cli", "serve",
                "--port", str(self.port), "--database", database, "--lease", "2",
                "--workflows", "examples.emp_pipeline:workflows",
                "--sources", "examples.emp_pipeline:sources",
                "--log-level", "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=self._log,
        )  # fmt: skip

    def ready(self) -> None:
        wait_http(f"http://127.0.0.1:{self.port}/healthz", proc=self.proc)

    @property
    def tag(self) -> str:
        """What this process's lease owner id contains (the default server id)."""
        return f"-{self.proc.pid}-"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def holders(database: str) -> list[str]:
    """Lease owners of the running workflows, read from the database."""
    store = open_store(database)
    await store.open()
    try:
        records = await store.list_workflows(statuses=["running"], limit=1000)
        return [r.lease_owner for r in records if r.lease_owner]
    finally:
        await store.close()


async def test_no_job_runs_twice_and_every_generation_ends_through_every_fault(pg_url, tmp_path):
    started: list[Instance] = []

    def start(name: str, port: int | None = None) -> Instance:
        instance = Instance(tmp_path, name, pg_url, queue.url, port)
        started.append(instance)
        return instance

    with running_emp_queue() as queue:
        try:
            live = [start(n) for n in ("a", "b", "c")]
            home = live[0]
            await asyncio.gather(*(asyncio.to_thread(i.ready) for i in live))
            queue.kill_workers(1)  # the first job to start loses its worker (SIGKILL)
            seen: list[float] = []

            def on_change(view: Any) -> None:
                seen.extend(s.progress for s in view.steps.values() if 0 < s.progress < 1)

            client = fast_client(f"ws://127.0.0.1:{home.port}", tmp_path / "client.db")
            async with client:
                client.on_change(on_change)
                handles = [
                    await client.submit_workflow(
                        "emp_generation", {"prompt": f"p{i}", "duration": 0.6}
                    )
                    for i in range(WORKFLOWS)
                ]
                killed: list[str] = []
                for round_ in range(2):
                    if round_ == 1:  # a second wave, so there is work to be killed in
                        handles += [
                            await client.submit_workflow(
                                "emp_generation", {"prompt": f"p{i}", "duration": 0.6}
                            )
                            for i in range(WORKFLOWS, 2 * WORKFLOWS)
                        ]
                    # SIGKILL an instance while it holds a running workflow, then restart it.
                    # (The client's own instance may be the one: it restarts on the same
                    # port and the client reconnects.)
                    victim = await wait_for(
                        lambda: _holding(pg_url, live), 30, 0.05, "an instance holding work"
                    )
                    victim.kill()
                    killed.append(victim.name)
                    live.remove(victim)
                    replacement = start(f"{victim.name}{round_}", victim.port)
                    live.append(replacement)
                    if round_ == 0:
                        starts = len(queue.books.starts)
                        before_cut = queue.books.connections
                        await asyncio.to_thread(queue.drop_connections)
                        await wait_for(lambda n=starts: len(queue.books.starts) > n + 1, 30)
                        await asyncio.to_thread(queue.restart_api, 0.5)
                    await asyncio.to_thread(replacement.ready)
                views = [await client.wait(h.id, timeout=90) for h in handles]
        finally:
            for instance in started:
                instance.stop()
        books = queue.books
        jobs = dict(queue.queue.jobs)

    logs = "\n".join(i.log_path.read_text(errors="replace")[-3000:] for i in started)
    assert [v.status for v in views] == ["completed"] * 2 * WORKFLOWS, logs
    # No job id ever started running twice.
    assert books.starts and max(books.starts.values()) == 1, books.starts
    # The right output of the right step: each step's result is its own job's data.
    for index, view in enumerate(views):
        for number, (step, service) in enumerate(
            (("prompt", "openai"), ("render", "comfyui"), ("upscale", "comfyui-upscale")), 1
        ):
            result = view.steps[step].result
            assert result["service"] == service and result["step"] == number
            assert result["echo"] == f"p{index}"
            assert jobs[result["job_id"]]["status"] == "completed"
    # Progress reached the client through the SyncClient.
    assert seen, "no intermediate progress reached the client"
    # Every fault really happened.
    assert len(killed) == 2 and books.restarts == 1 and books.events_lost > 0
    assert len(books.dead) == 1 and books.cancels[books.dead[0]] >= 1
    assert jobs[books.dead[0]]["status"] == "failed"  # cancelled, replaced by a new id
    assert books.connections > before_cut  # the adapters reconnected after the cut


async def _holding(database: str, candidates: list[Instance]) -> Instance | None:
    owners = await holders(database)
    for instance in candidates:
        if instance.proc.poll() is None and any(instance.tag in o for o in owners):
            return instance
    return None
