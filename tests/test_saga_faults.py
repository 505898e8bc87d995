"""Process-level faults of the saga engine: kill -9, two instances, SIGSTOP past a lease.

Runner processes (``tests/saga_worker.py``) share a database; the flaky job service
(``examples/job_service.py``) runs in this process on loopback and keeps the books: one
effect per idempotency key, and no two attempts of one key in flight at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from examples.job_service import running_job_service
from sync_server.saga.machine import idempotency_key
from sync_server.store import open_store
from tests.conftest import wait_for
from tests.saga_helpers import step_history, submit, wait_all, wait_status
from tests.saga_worker import fault_workflows

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A runner process; its stderr goes to a file we can read afterwards."""

    def __init__(self, tmp: Path, url: str, job_url: str, name: str, lease: float) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.saga_worker",
                "--database",
                url,
                "--instance",
                name,
                "--job-service",
                job_url,
                "--lease",
                str(lease),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.proc.stdout.readline()
        assert line.strip() == b"READY", self.log()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(url, job_url, name, lease=1.0):
        worker = Worker(tmp_path, url, job_url, name, lease)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def job_service():
    with running_job_service() as service:
        yield service


def pipeline(job_url):
    return fault_workflows(job_url)[0]


def job_workflow(job_url):
    return fault_workflows(job_url)[1]


async def test_sigkill_mid_step_then_restart_completes_once(sqlite_url, job_service, workers):
    store = open_store(sqlite_url)
    await store.open()
    try:
        wf = pipeline(job_service.url)
        # The dead attempt's job ends (0.8 s) before its lease (1.5 s) can be taken over,
        # so a second attempt never overlaps it at the service.
        first = workers(sqlite_url, job_service.url, "w1", lease=1.5)
        [wid] = await submit(store, wf, {"prompt": "cat", "render": {"duration": 0.8}})
        key = idempotency_key(wid, "render", tenant="t1")
        await wait_for(lambda: job_service.books.active[key] >= 1, timeout=20)
        first.kill()  # SIGKILL mid-render: nothing is released
        assert (await store.get_workflow("t1", wid)).lease_owner == "w1"
        workers(sqlite_url, job_service.url, "w2", lease=1.5)
        record = await wait_status(store, wid, "completed", timeout=30)
        books = job_service.books
        assert books.effects[key] == 1  # one effect for the idempotency key
        # The re-run looked the key up and took the done job's result (adapters.keyed):
        # the service saw a single render request.
        assert books.attempts[key] == 1 and books.overlaps == []
        ledger = books.ledger
        assert ledger["reserve"][idempotency_key(wid, "reserve_credits", tenant="t1")] >= 1
        assert ledger["charge"][idempotency_key(wid, "charge", tenant="t1")] == 1
        assert record.result == {"charged": 1}
        history = await step_history(store, wid)
        assert ("render", "retrying", 1) in history  # taken over, same attempt re-run
        assert [h for h in history if h[0] == "render" and h[1] == "succeeded"] == [
            ("render", "succeeded", 1)
        ]
    finally:
        await store.close()


async def test_two_instances_on_postgres_200_workflows_kill_one(pg_url, job_service, workers):
    store = open_store(pg_url)
    await store.open()
    try:
        wf = job_workflow(job_service.url)
        a = workers(pg_url, job_service.url, "A", lease=1.5)
        b = workers(pg_url, job_service.url, "B", lease=1.5)
        ids = await submit(store, wf, [{"render": {"duration": 0.05}} for _ in range(200)])

        async def some_done():
            rows = await store.list_workflows(statuses=["completed"], limit=300)
            return len(rows) >= 40

        await wait_for(some_done, timeout=60)
        a.kill()  # mid-run
        orphans = [r.id for r in await store.list_workflows(limit=300) if r.lease_owner == "A"]
        records = await wait_all(store, ids, {"completed"}, timeout=60)
        assert len(records) == 200 and all(r.status == "completed" for r in records)
        assert orphans, "the kill should have left work behind (sometimes assertion)"
        books = job_service.books
        assert books.overlaps == []  # no attempt of a key ever ran on both at once
        assert all(books.effects[idempotency_key(wid, "call", tenant="t1")] == 1 for wid in ids)
        assert b.proc.poll() is None
    finally:
        await store.close()


async def test_sigstop_past_lease_then_sigcont_refuses_stale_write(pg_url, job_service, workers):
    store = open_store(pg_url)
    await store.open()
    try:
        wf = job_workflow(job_service.url)
        a = workers(pg_url, job_service.url, "A", lease=1.0)
        [wid] = await submit(store, wf, {"render": {"duration": 0.8}})
        key = idempotency_key(wid, "call", tenant="t1")
        await wait_for(lambda: job_service.books.active[key] >= 1, timeout=20)
        a.signal(signal.SIGSTOP)  # paused mid-step, holding its lease
        paused = await store.get_workflow("t1", wid)
        assert paused is not None and paused.lease_until is not None
        before = {e.seq for e in await store.read_workflow_events("t1", wid)}
        workers(pg_url, job_service.url, "B", lease=5.0)
        record = await wait_status(store, wid, "completed", timeout=30)
        # B took over only after A's lease: everything written since the pause is B's,
        # and none of it before the lease A last renewed ran out. (Not "1 s after the
        # pause": A renewed before it, and B attaches to the render A left running.)
        since = [e.at for e in await store.read_workflow_events("t1", wid) if e.seq not in before]
        assert since and min(since) >= paused.lease_until
        a.signal(signal.SIGCONT)
        # A wakes up: either its outcome reaches the store first and is refused (fencing),
        # or its heartbeat first learns that the lease is gone and drops the attempt.
        # (test_saga_runner.test_fencing_refuses_a_stale_owner pins the first case.)
        await wait_for(
            lambda: "stale write refused" in a.log() or "lease of workflow" in a.log(),
            timeout=20,
        )
        again = await store.get_workflow("t1", wid)
        assert again.version == record.version and again.result == record.result
        history = await step_history(store, wid)
        assert [h for h in history if h[1] == "succeeded"] == [("call", "succeeded", 1)]
        assert job_service.books.effects[key] == 1 and job_service.books.overlaps == []
    finally:
        await store.close()
