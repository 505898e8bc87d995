"""Workflow versions: the fingerprint, the versioned claim on both backends (and its
index on PostgreSQL), and an instance that runs the versions it has."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from sync_server.saga import DefinitionError, Limit, Step, Workflow
from sync_server.saga.alerts import RecordingAlerts
from sync_server.saga.definitions import fingerprint
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store
from tests.saga_helpers import submit, wait_all

pytestmark = pytest.mark.timeout(60)


async def act(ctx):
    return ctx.step


async def undo(ctx):
    return None


def shape(**changes):
    steps = {
        "a": Step("a", act, compensate=undo),
        "b": Step("b", act, depends_on=["a"]),
    }
    steps.update(changes.pop("steps", {}))
    return Workflow("w", list(steps.values()), **changes)


def test_fingerprint_follows_the_shape_not_the_tuning():
    base = shape().version
    assert base.startswith("fp-") and len(base) == 15
    assert shape().version == base
    # Tuning and code do not make a new version ...
    assert shape(steps={"b": Step("b", undo, depends_on=["a"], timeout=5)}).version == base
    assert shape(deadline=30).version == base
    # ... the shape does: a renamed or added step, a dependency, a compensation, a limit,
    # on_failure.
    assert shape(steps={"c": Step("c", act)}).version != base
    assert shape(steps={"b": Step("b", act)}).version != base
    assert shape(steps={"b": Step("b", act, depends_on=["a"], compensate=undo)}).version != base
    assert shape(steps={"b": Step("b", act, depends_on=["a"], limit="x")}).version != base
    assert shape(on_failure="park").version != base
    assert shape(version="2024-06").version == "2024-06"
    for bad in ("", " ", "x" * 65, 3):
        with pytest.raises(DefinitionError):
            shape(version=bad)
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(DefinitionError):
            shape(deadline=bad)


def test_fingerprint_is_the_same_in_another_process():
    code = "from tests.test_saga_versions import shape; print(shape().version)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == fingerprint(shape())


@pytest.fixture
async def store(database_url):
    s = open_store(database_url)
    await s.open()
    yield s
    await s.close()


async def test_claim_takes_only_the_pairs_it_is_given(store):
    v1 = shape(version="v1")
    v2 = shape(version="v2", steps={"c": Step("c", act)})
    other = Workflow("other", [Step("x", act)], version="v1")
    old = await submit(store, v1, count=3)
    new = await submit(store, v2, count=2)
    await submit(store, other, count=2)
    now = (await store.get_workflow("t1", old[0])).created_at + 1
    got = await store.claim_due_workflows("A", now, 10, 100, [("w", "v2")])
    assert sorted(r.id for r in got) == sorted(new)
    assert all(r.workflow_version == "v2" for r in got)
    assert await store.claim_due_workflows("A", now, 10, 100, [("w", "v3")]) == []
    assert await store.claim_due_workflows("A", now, 10, 100, []) == []
    got = await store.claim_due_workflows("B", now, 10, 100, [("w", "v1"), ("other", "v1")])
    assert len(got) == 5 and {r.name for r in got} == {"w", "other"}
    assert sorted(r.id for r in got if r.name == "w") == sorted(old)


async def test_an_instance_runs_every_version_it_has(store):
    v1 = shape(version="v1")
    v2 = shape(version="v2", steps={"c": Step("c", act, depends_on=["b"])})
    old = await submit(store, v1, count=3)
    runner = SagaRunner(
        store, [v1, v2], rng=random.Random(1), alerts=RecordingAlerts(), poll_interval=0.2
    )
    await runner.start()
    try:
        new = await submit(store, runner.workflows["w"], count=3)  # the current: v2
        done = await wait_all(store, old + new, {"completed"})
    finally:
        await runner.stop()
    versions = {r.id: (r.workflow_version, tuple(sorted(r.state["steps"]))) for r in done}
    assert {versions[i] for i in old} == {("v1", ("a", "b"))}
    assert {versions[i] for i in new} == {("v2", ("a", "b", "c"))}


async def test_claim_statement_uses_the_version_index_on_postgres(pg_url):
    """The claim must stay an index scan per known pair however many due rows other
    versions leave behind (LESSONS: prepared statements and generic plans)."""
    from sync_server.store.pg_transaction import CLAIM_DUE_VERSIONED

    store = open_store(pg_url)
    await store.open()
    try:
        stale = shape(version="gone")
        await submit(store, stale, count=3000)
        await submit(store, shape(version="v1"), count=5)
        pool = store._require_pool()
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE workflows")
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE claim AS {CLAIM_DUE_VERSIONED}")
            plan = "\n".join(
                row[0]
                for row in await conn.fetch(
                    "EXPLAIN EXECUTE claim('x', 1e12, 1e12, 10, '{w}', '{v1}')"
                )
            )
            await conn.execute("DEALLOCATE claim")
            await conn.execute("RESET plan_cache_mode")
    finally:
        await store.close()
    assert "Index Scan using workflows_claim_version" in plan, plan
    assert "workflows_due" not in plan, plan  # never walks the other versions' due rows


def test_limits_name_mismatch_is_refused_by_create_app(tmp_path):
    from sync_server import create_app

    wf = Workflow("w", [Step("s", act, limit="farm")])
    with pytest.raises(DefinitionError):
        create_app(f"sqlite:///{tmp_path}/d.db", workflows=[wf], auth_secret="s" * 32)
    create_app(
        f"sqlite:///{tmp_path}/d.db",
        workflows=[wf],
        auth_secret="s" * 32,
        limits={"farm": Limit(concurrency=2)},
    )
