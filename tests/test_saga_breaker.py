"""The circuit breaker's pure core, and its shared state through the store."""

from __future__ import annotations

import pytest

from sync_server.saga.breaker import (
    BreakerPolicy,
    BreakerState,
    allow,
    record_failure,
    record_success,
)
from sync_server.store import open_store
from sync_server.store.base import BreakerRecord

pytestmark = pytest.mark.timeout(30)

POLICY = BreakerPolicy(failure_threshold=3, reset_timeout=10.0, probe_timeout=5.0, recheck=0.5)


def test_closed_allows_and_counts_failures_until_open():
    rec = BreakerRecord(name="svc")
    assert allow(rec, POLICY, 0, "me").allowed
    rec, opened = record_failure(rec, POLICY, 1)
    assert not opened and rec.failures == 1 and rec.state == "closed"
    rec, opened = record_failure(rec, POLICY, 2)
    rec, opened = record_failure(rec, POLICY, 3)
    assert opened and rec.state == BreakerState.OPEN and rec.opened_at == 3


def test_success_resets_failures():
    rec = BreakerRecord(name="svc", failures=2)
    rec, changed = record_success(rec, 1)
    assert rec.failures == 0 and not changed
    same, changed = record_success(rec, 2)
    assert same is rec and not changed


def test_open_refuses_until_reset_then_one_probe():
    rec = BreakerRecord(name="svc", state="open", failures=3, opened_at=100.0)
    decision = allow(rec, POLICY, 105, "me")
    assert not decision.allowed and decision.retry_at == 110.0 and not decision.changed
    probe = allow(rec, POLICY, 110, "me/wf1")
    assert probe.allowed and probe.changed
    assert probe.record.state == "half_open" and probe.record.probe_owner == "me/wf1"
    # while the probe runs, others wait a little (not longer than the probe may take)
    other = allow(probe.record, POLICY, 111, "you")
    assert not other.allowed and other.retry_at == 111.5
    # a probe that went silent is replaced
    late = allow(probe.record, POLICY, 116, "you")
    assert late.allowed and late.record.probe_owner == "you"


def test_half_open_probe_outcomes():
    half = BreakerRecord(name="svc", state="half_open", failures=3, opened_at=0.0)
    waiting = allow(half, POLICY, 1, "x")
    assert not waiting.allowed and waiting.retry_at == 1.5
    closed, changed = record_success(half, 5)
    assert changed and closed.state == "closed" and closed.failures == 0
    reopened, opened = record_failure(half, POLICY, 6)
    assert opened and reopened.state == "open" and reopened.opened_at == 6


def test_open_stays_open_on_more_failures():
    rec = BreakerRecord(name="svc", state="open", failures=3, opened_at=1.0)
    rec2, opened = record_failure(rec, POLICY, 2)
    assert not opened and rec2.state == "open" and rec2.failures == 4


async def test_shared_state_through_the_store(database_url):
    store = open_store(database_url)
    await store.open()
    try:
        rec, _ = record_failure(BreakerRecord(name="svc"), BreakerPolicy(failure_threshold=1), 5)

        async def put(tx):
            await tx.put_breaker(rec)

        await store.run(put)

        async def get(tx):
            return await tx.get_breaker("svc")

        other = await store.run(get)  # what another instance would read
        assert other.state == "open" and other.opened_at == 5
        assert not allow(other, POLICY, 6, "b").allowed
        assert [b.name for b in await store.list_breakers()] == ["svc"]
    finally:
        await store.close()
