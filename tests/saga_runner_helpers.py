"""Helpers shared by the test_saga_runner test files (moved from test_saga_runner.py)."""

from __future__ import annotations

import random

import pytest

from sync_server.saga import Step, Workflow
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store


@pytest.fixture
async def env(database_url):
    """A store and a factory of runners (all stopped at the end)."""
    store = open_store(database_url)
    await store.open()
    runners: list[SagaRunner] = []

    async def runner(workflows, **options):
        options.setdefault("rng", random.Random(1))
        options.setdefault("alerts", RecordingAlerts())
        options.setdefault("poll_interval", 0.2)
        r = SagaRunner(store, workflows, **options)
        runners.append(r)
        await r.start()
        return r

    yield store, runner
    for r in runners:
        await r.stop()
    await store.close()


def noop_chain(name="chain", n=3):
    async def noop(ctx):
        return {"step": ctx.step, "key": ctx.idempotency_key, "deps": sorted(ctx.results)}

    steps = [Step(f"s{i}", noop, depends_on=[f"s{i - 1}"] if i else []) for i in range(n)]
    return Workflow(name, steps)
