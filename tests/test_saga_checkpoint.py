"""Checkpoints read → decide → write: breaker transitions are reported after COMMIT only.

A checkpoint that opens a circuit breaker runs inside ``Store.run``, which re-runs the
whole transaction after a PostgreSQL deadlock. The transition must be reported (log,
metric, alert) exactly once however often the body ran, and never for a commit that
failed. The faults are injected after the transaction body ran — i.e. after the breaker
write — on PostgreSQL as real errors raised by the server (SQLSTATE 40P01, a deadlock,
which ``PostgresStore.run`` retries; 22023, a data exception, which it does not), on
SQLite (no deadlocks) by re-running the body the way ``PostgresStore.run`` does.
"""

from __future__ import annotations

import random

import pytest

from protocol import StorageError
from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.breaker import BreakerPolicy
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store
from tests.saga_helpers import submit, wait_status

pytestmark = pytest.mark.timeout(60)

POLICY = BreakerPolicy(failure_threshold=1, reset_timeout=600.0)


class RecordingMetrics:
    """The ``SagaMetrics`` hooks, recording breaker changes."""

    def __init__(self):
        self.breakers: list[tuple[str, str]] = []

    def observe_append(self, source, seconds):
        pass

    def step_attempt(self, workflow, step, attempt, compensation):
        pass

    def workflow_finished(self, workflow, status):
        pass

    def breaker_changed(self, name, state):
        self.breakers.append((name, state))


class _Rerun(Exception):
    """SQLite's stand-in for a deadlock: the wrapper runs the transaction again."""


async def _down(ctx):
    raise RuntimeError("503 from the downstream")


GUARDED = Workflow(
    "guarded",
    [Step("call", _down, breaker="svc", retry=RetryPolicy(max_attempts=1))],
    on_failure="park",
)


async def _opens_breaker(tx, before):
    after = await tx.get_breaker("svc", lock=False)
    was_open = before is not None and before.state == "open"
    return after is not None and after.state == "open" and not was_open


def _fail_commits_that_open_the_breaker(store, monkeypatch, fault, *, times, postgres):
    """Make the first ``times`` transactions that open breaker ``svc`` fail after their
    body ran (``fault(tx)`` raises); returns the list of faults injected."""
    original = store.run
    injected: list[int] = []

    async def run(fn, **options):
        async def unit(tx):
            before = await tx.get_breaker("svc", lock=False)
            result = await fn(tx)
            if len(injected) < times and await _opens_breaker(tx, before):
                injected.append(1)
                await fault(tx, postgres)
            return result

        while True:
            try:
                return await original(unit, **options)
            except _Rerun:
                continue  # what PostgresStore.run does after a deadlock

    monkeypatch.setattr(store, "run", run)
    return injected


async def _deadlock(tx, postgres):
    if postgres:  # PostgreSQL: the server itself reports a deadlock
        await tx._conn.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'forced deadlock' USING ERRCODE = '40P01'; END $$"
        )
    raise _Rerun


async def _refusal(tx, postgres):
    if postgres:  # PostgreSQL: a data exception, never retried
        await tx._conn.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'forced refusal' USING ERRCODE = '22023'; END $$"
        )
    raise StorageError("forced refusal") from ValueError("forced refusal")


@pytest.fixture
async def store(database_url):
    store = open_store(database_url)
    await store.open()
    yield store
    await store.close()


async def _run_guarded(store, alerts, metrics):
    runner = SagaRunner(
        store,
        [GUARDED],
        rng=random.Random(1),
        alerts=alerts,
        metrics=metrics,
        breakers={"svc": POLICY},
        poll_interval=0.2,
    )
    await runner.start()
    try:
        [wid] = await submit(store, GUARDED)
        return await wait_status(store, wid, "parked")
    finally:
        await runner.stop()


async def test_a_retried_checkpoint_reports_its_breaker_change_once(
    store, monkeypatch, database_url
):
    postgres = database_url.startswith("postgres")
    injected = _fail_commits_that_open_the_breaker(
        store, monkeypatch, _deadlock, times=1, postgres=postgres
    )
    alerts, metrics = RecordingAlerts(), RecordingMetrics()
    await _run_guarded(store, alerts, metrics)
    assert injected == [1]  # the transaction that opened the breaker did run twice
    assert [b.state for b in await store.list_breakers()] == ["open"]
    assert metrics.breakers == [("svc", "open")]
    assert alerts.kinds().count("breaker_open") == 1


async def test_a_failed_commit_reports_no_breaker_change(store, monkeypatch, database_url):
    postgres = database_url.startswith("postgres")
    injected = _fail_commits_that_open_the_breaker(
        store, monkeypatch, _refusal, times=100, postgres=postgres
    )
    alerts, metrics = RecordingAlerts(), RecordingMetrics()
    record = await _run_guarded(store, alerts, metrics)
    # The batch and the workflow on its own were refused; the quarantined outcome (a
    # permanent failure: not the downstream's health) committed without the breaker.
    assert len(injected) == 2
    assert "checkpoint refused by the store" in record.state["steps"]["call"]["error"]
    assert [b.state for b in await store.list_breakers()] in ([], ["closed"])
    assert metrics.breakers == []
    assert "breaker_open" not in alerts.kinds()
