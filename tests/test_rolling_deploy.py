"""Rolling deploys and shared limits across real server processes on PostgreSQL.

Runner processes (``tests/deploy_worker.py``) share one database and call the render
farm test double, whose books show — from the downstream's side — which instance and
definition version ran each step, and how many jobs ran at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.deploy_worker import render_workflows
from tests.render_farm import running_farm, split_key
from tests.saga_helpers import submit, wait_all

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, tmp: Path, url: str, farm: str, name: str, versions: str, **opts):
        self.log_path = tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        extra = [f"--{k}={v}" for k, v in opts.items()]
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.deploy_worker", "--database", url),
                *("--instance", name, "--farm", farm, "--versions", versions, *extra),
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

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(url, farm, name, versions, **opts):
        worker = Worker(tmp_path, url, farm, name, versions, **opts)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def farm():
    with running_farm() as service:
        yield service


def _definitions(farm_url):
    v1, v2 = render_workflows(farm_url, "test", ["1", "2"])
    return v1, v2


async def test_rolling_deploy_mid_step_runs_each_workflow_on_its_own_version(pg_url, farm, workers):
    from sync_server.store import open_store

    v1, v2 = _definitions(farm.url)
    store = open_store(pg_url)
    await store.open()
    try:
        old = workers(pg_url, farm.url, "old", "1")
        slow = {"prepare": 0.05, "draw": 1.5, "store": 0.05}
        first = await submit(store, v1, slow, count=12)

        # The old build is mid-step on version 1 work when the new build comes up.
        await wait_for(
            lambda: _started(farm, "draw") >= 3, timeout=20, message="v1 draws under way"
        )
        new = workers(pg_url, farm.url, "new", "2")
        second = await submit(store, v2, {"prepare": 0.05, "paint": 0.2}, count=12)
        old.stop()  # the old instance goes away mid-step (graceful: leases released)
        fences = {wid: (await store.get_workflow("t1", wid)).fence for wid in first}

        # Only the new build is up: version 2 completes; meanwhile version 1 is left
        # alone — never claimed (its fence never moves) by an instance that lacks its
        # definition: no crash, no hand-back loop.
        await wait_all(store, second, {"completed"}, timeout=60)
        left = [await store.get_workflow("t1", wid) for wid in first]
        assert {r.id: r.fence for r in left} == fences
        assert any(r.status == "running" for r in left), "v1 work should be waiting"
        assert all(r.lease_owner in (None, "old") for r in left)
        assert "KeyError" not in new.log() and "Traceback" not in new.log()

        # An instance that has version 1 comes up: nothing is stuck any more.
        workers(pg_url, farm.url, "both", "1,2")
        done = await wait_all(store, first, {"completed"}, timeout=60)
        assert {r.workflow_version for r in done} == {"v1"}
    finally:
        await store.close()

    # From the farm's side: every step ran under its workflow's own version.
    by_version = {wid: "1" for wid in first} | {wid: "2" for wid in second}
    for _at, key, _tenant, instance, version in farm.books.starts:
        wid, step = split_key(key)
        assert version == by_version[wid], (key, instance, version)
        if version == "1":
            assert step in {"prepare", "draw", "store"} and instance in {"old", "both"}
        else:
            assert step in {"prepare", "paint", "store", "publish"}
    assert {split_key(k)[1] for k in farm.books.calls if split_key(k)[0] in second} == {
        "prepare",
        "paint",
        "store",
        "publish",
    }


def _started(farm, step):
    return sum(1 for s in farm.books.starts if s[1].endswith(":" + step))


async def test_limit_holds_across_two_instances_and_survives_sigkill(pg_url, farm, workers):
    from sync_server.store import open_store

    v1, _ = _definitions(farm.url)
    store = open_store(pg_url)
    await store.open()
    try:
        a = workers(pg_url, farm.url, "a", "1", concurrency=3)
        workers(pg_url, farm.url, "b", "1", concurrency=3)
        ids = await submit(store, v1, {"draw": 0.3}, count=30)
        await wait_for(lambda: _started(farm, "draw") >= 6, timeout=30, message="draws")
        a.stop(signal.SIGKILL)  # its slots must lapse with its leases, not leak
        records = await wait_all(store, ids, {"completed"}, timeout=90)
    finally:
        await store.close()
    assert len(records) == 30
    assert farm.books.max_active["draw"] == 3  # never more, and the capacity was used
    assert _started(farm, "draw") >= 30


async def test_deadline_holds_across_a_sigkilled_instance(pg_url, farm, workers):
    """The deadline is stored with the workflow: the instance running it dies mid-step,
    another takes it over, and the deadline still ends it (compensated, dead letter)."""
    from sync_server.store import open_store

    v1, _ = _definitions(farm.url)
    store = open_store(pg_url)
    await store.open()
    try:
        first = workers(pg_url, farm.url, "first", "1")
        [wid] = await submit(store, v1, {"draw": 60.0}, deadline=4.0)
        await wait_for(lambda: _started(farm, "draw") >= 1, timeout=20, message="draw starts")
        first.stop(signal.SIGKILL)
        workers(pg_url, farm.url, "second", "1")
        [record] = await wait_all(store, [wid], {"compensated"}, timeout=30)
        [letter] = await store.list_dlq()
    finally:
        await store.close()
    assert letter.reason == "deadline_exceeded" and letter.workflow_id == wid
    assert "deadline exceeded" in (record.error or "")
    assert record.state["steps"]["store"]["status"] == "skipped"
