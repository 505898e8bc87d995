"""Named limits: the pure admission rule, the shared tables on both backends, and the
runner keeping a downstream within its concurrency and rate, fairly across tenants."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from sync_server.saga import DefinitionError, Limit, Step, Workflow
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.limits import decide
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store
from sync_server.store.base import WorkflowRecord
from tests.saga_helpers import submit, wait_all

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ the rule


def test_limit_values_are_checked():
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(DefinitionError):
            Limit(concurrency=bad)
        with pytest.raises(DefinitionError):
            Limit(per_second=bad)
    assert Limit(concurrency=2, per_second=5) == Limit(2, 5)


def test_decide_admits_only_within_capacity_and_in_turn():
    limit = Limit(concurrency=3)
    assert decide(limit, running=0, starts=0, oldest_start=None, position=2, now=10).admitted
    assert not decide(limit, 1, 0, None, 2, 10).admitted  # two free, third in line
    late = decide(limit, 3, 0, None, 0, 10.0)
    assert not late.admitted and 10.0 < late.retry_at <= 10.0 + 30
    assert decide(Limit(), 10_000, 10_000, 0.0, 500, 1.0).admitted  # no caps


def test_decide_rate_window_and_when_to_come_back():
    limit = Limit(per_second=2)
    assert decide(limit, 0, 1, 9.5, 0, 10.0).admitted
    blocked = decide(limit, 0, 2, 9.4, 0, 10.0)
    assert not blocked.admitted and blocked.retry_at == pytest.approx(9.4 + 1.1)
    third = decide(limit, 0, 2, 9.4, 3, 10.0)  # three ahead of it: 1.5 s later still
    assert third.retry_at == pytest.approx(9.4 + 1.1 + 1.5)


def test_a_step_naming_an_unconfigured_limit_fails_at_start(tmp_path):
    wf = Workflow("w", [Step("s", _noop, limit="gpu")])
    with pytest.raises(DefinitionError, match="gpu"):
        SagaRunner(open_store(f"sqlite:///{tmp_path}/x.db"), [wf], limits={})


async def _noop(ctx):
    return None


# ------------------------------------------------------------------ the tables


@pytest.fixture
async def store(database_url):
    s = open_store(database_url)
    await s.open()
    yield s
    await s.close()


async def _row(store, tenant, created_at, owner=None, fence=0, lease_until=None):
    record = WorkflowRecord(
        id=str(uuid.uuid4()),
        tenant=tenant,
        name="w",
        status="running",
        created_at=created_at,
        updated_at=created_at,
        due_at=created_at,
        lease_owner=owner,
        lease_until=lease_until,
        fence=fence,
    )

    async def unit(tx):
        assert await tx.insert_workflow(record)

    await store.run(unit)
    return record


async def test_a_slot_counts_only_while_its_lease_and_fence_hold(store):
    now = time.time()
    held = await _row(store, "t", now, owner="A", fence=4, lease_until=now + 10)

    async def take(tx):
        await tx.lock_limit("farm", now, rate=True)
        await tx.limit_position("farm", "t", held.id, "s", held.created_at, now, now - 60)
        await tx.take_limit_slot("farm", "t", held.id, "s", "A", 4, now)
        return await tx.lock_limit("farm", now, rate=True)

    running, starts, oldest = await store.run(take)
    assert (running, starts, oldest) == (1, 1, now)
    # Lease expired (the holder was SIGKILLed): the slot no longer counts.
    assert (await store.run(lambda tx: tx.lock_limit("farm", now + 11, rate=False)))[0] == 0
    # A takeover bumped the fence: the old holder's slot no longer counts either.
    held.fence, held.lease_owner, held.lease_until = 5, "B", now + 10

    async def takeover(tx):
        await tx.update_workflow(held)
        return await tx.lock_limit("farm", now, rate=True)

    assert (await store.run(takeover))[:2] == (0, 1)  # the start still counts in its second

    async def release(tx):
        return await tx.release_limit_slots([("t", held.id, "s")])

    assert await store.run(release) == {"farm"}
    assert await store.run(release) == set()


async def test_waiters_are_ordered_round_robin_across_tenants(store):
    now = time.time()
    # Tenant a's burst of four comes first; b's two later: b is not starved behind a.
    a = [await _row(store, "a", now - 10 + i) for i in range(4)]
    b = [await _row(store, "b", now - 5 + i) for i in range(2)]

    async def queue(tx):
        for record in [*a, *b]:
            await tx.limit_position(
                "farm", record.tenant, record.id, "s", record.created_at, now, 0
            )
        return [
            await tx.limit_position("farm", r.tenant, r.id, "s", r.created_at, now, 0)
            for r in [*a, *b]
        ]

    positions = await store.run(queue)
    order = [r.tenant for _, r in sorted(zip(positions, [*a, *b], strict=True))]
    assert order == ["a", "b", "a", "b", "a", "a"]
    assert sorted(positions) == list(range(6))

    # Waiters nobody looked at since the horizon (their workflows vanished) no longer
    # hold their places: 200 s later, only the one just seen again counts.
    async def late(tx):
        later = now + 200
        return await tx.limit_position(
            "farm", "b", b[1].id, "s", b[1].created_at, later, later - 120
        )

    assert await store.run(late) == 0


# ------------------------------------------------------------------ the runner


class Farm:
    """An in-process downstream that counts how many jobs run at once."""

    def __init__(self, duration):
        self.duration = duration
        self.active = 0
        self.max_active = 0
        self.starts: list[tuple[float, str]] = []

    async def render(self, ctx):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.starts.append((time.time(), ctx.tenant))
        try:
            await asyncio.sleep(self.duration)
        finally:
            self.active -= 1
        return ctx.attempt


@pytest.fixture
async def env(database_url):
    store = open_store(database_url)
    await store.open()
    runners: list[SagaRunner] = []

    async def runner(workflows, **options):
        r = SagaRunner(
            store,
            workflows,
            rng=random.Random(1),
            alerts=RecordingAlerts(),
            poll_interval=0.2,
            **options,
        )
        runners.append(r)
        await r.start()
        return r

    yield store, runner
    for r in runners:
        await r.stop()
    await store.close()


async def test_concurrency_limit_is_never_exceeded_and_waiting_uses_no_attempt(env):
    store, runner = env
    farm = Farm(0.05)
    wf = Workflow("render", [Step("render", farm.render, limit="farm")])
    await runner([wf], limits={"farm": Limit(concurrency=3)})
    ids = await submit(store, wf, count=30)
    records = await wait_all(store, ids, {"completed"}, timeout=60)
    assert farm.max_active == 3  # never more, and the capacity was used
    assert len(farm.starts) == 30
    assert all(r.result == 1 for r in records)  # every step ran on its first attempt
    assert all(r.state["steps"]["render"]["attempts"] == 1 for r in records)


async def test_per_second_limit_admits_at_most_n_starts_in_any_second(env, monkeypatch):
    """The rate holds for the admissions (the starts the database records); the
    downstream sees them a commit later, so its own view may bunch by that delay (the
    window's 100 ms guard absorbs the usual one)."""
    from sync_server.saga import limits

    admitted: list[float] = []
    admit = limits.LimitGate.admit

    async def spy(self, name, record, step, now):
        outcome = await admit(self, name, record, step, now)
        if outcome.admitted:
            admitted.append(now)
        return outcome

    monkeypatch.setattr(limits.LimitGate, "admit", spy)
    store, runner = env
    farm = Farm(0.0)
    wf = Workflow("render", [Step("render", farm.render, limit="farm")])
    await runner([wf], limits={"farm": Limit(per_second=5)})
    ids = await submit(store, wf, count=15)
    await wait_all(store, ids, {"completed"}, timeout=60)
    assert len(farm.starts) == 15 and len(admitted) == 15
    times = sorted(admitted)
    for i, start in enumerate(times):
        assert sum(1 for t in times[i:] if t < start + 1.0) <= 5
    assert times[-1] - times[0] >= 2.0  # 15 starts at 5/s need at least two more seconds
    jobs = sorted(at for at, _ in farm.starts)
    assert jobs[-1] - jobs[0] >= 2.0  # and the downstream saw them spread as well


async def test_one_tenants_burst_does_not_starve_another(env):
    store, runner = env
    farm = Farm(0.02)
    wf = Workflow("render", [Step("render", farm.render, limit="farm")])
    now = time.time()
    await submit(store, wf, tenant="big", count=40, now=now - 1)
    await submit(store, wf, tenant="small", count=5, now=now)
    await runner([wf], limits={"farm": Limit(concurrency=1)})
    await wait_for_count(farm, 45)
    order = [tenant for _, tenant in sorted(farm.starts)]
    # Submit order would run all 40 of "big" first; round-robin interleaves them.
    assert order.index("small") <= 2
    last_small = max(i for i, tenant in enumerate(order) if tenant == "small")
    assert last_small <= 12, order


async def wait_for_count(farm, n):
    from tests.conftest import wait_for

    await wait_for(lambda: len(farm.starts) >= n and farm.active == 0, timeout=60)
