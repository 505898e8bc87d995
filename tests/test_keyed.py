"""The look-up-then-attach/take/submit pattern (``sync_server.adapters.keyed``).

A small in-memory downstream that is *not* idempotent (a submit of a known id runs it
again) stands in for emp-job-queue; the real queue is in tests/test_emp_job_queue.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

from sync_server.adapters.keyed import (
    Action,
    JobView,
    TooManyGenerations,
    decide,
    generation_id,
    run_keyed,
)


class Memory:
    """Jobs by id; ``plan`` says how each submitted job ends."""

    def __init__(self, plan: list[str]) -> None:
        self.jobs: dict[str, JobView] = {}
        self.runs: Counter[str] = Counter()
        self.plan = plan

    async def lookup(self, job_id: str) -> JobView:
        return self.jobs.get(job_id, JobView("absent"))

    async def submit(self, job_id: str) -> None:
        self.runs[job_id] += 1
        self.jobs[job_id] = JobView("running")

    async def wait(self, job_id: str, view: JobView) -> JobView:
        end = self.plan.pop(0)
        if end == "ok":
            final = JobView("completed", result={"id": job_id})
        else:
            final = JobView("failed", error=end, abandoned=end == "dead")
        self.jobs[job_id] = final
        return final


def test_the_rule_per_generation():
    assert decide(JobView("pending")) is Action.ATTACH
    assert decide(JobView("running")) is Action.ATTACH
    assert decide(JobView("completed", result=1)) is Action.TAKE
    assert decide(JobView("absent")) is Action.SUBMIT
    assert decide(JobView("failed")) is Action.NEXT
    with pytest.raises(ValueError):
        JobView("cancelled")


def test_job_ids_are_stable_distinct_and_uuid_shaped():
    assert generation_id("w:s", 0) == generation_id("w:s", 0)
    ids = {generation_id(k, g) for k in ("w:s", "w:t") for g in range(3)}
    assert len(ids) == 6 and all(len(i) == 36 and i.count("-") == 4 for i in ids)


async def test_each_attempt_reuses_what_exists_and_resubmits_only_after_a_failure():
    memory = Memory(["boom", "ok"])
    first = await run_keyed(memory, "w:s")
    assert first.view.status == "failed" and first.submitted
    second = await run_keyed(memory, "w:s")  # skips the failed id, submits the next
    assert second.view.result == {"id": generation_id("w:s", 1)}
    third = await run_keyed(memory, "w:s")  # takes the result, submits nothing
    assert third.view.status == "completed" and not third.submitted
    assert set(memory.runs.values()) == {1} and len(memory.runs) == 2


async def test_an_abandoned_job_is_replaced_in_the_same_call():
    memory = Memory(["dead", "ok"])
    outcome = await run_keyed(memory, "k")
    assert outcome.view.status == "completed" and outcome.job_id == generation_id("k", 1)
    assert max(memory.runs.values()) == 1


async def test_generations_are_bounded():
    memory = Memory(["dead"] * 3)
    with pytest.raises(TooManyGenerations):
        await run_keyed(memory, "k", generations=3)
