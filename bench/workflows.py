"""The workflows the bench servers run (``--workflows bench.workflows:ALL``).

* ``noop`` — one no-op step (ingest and fan-out figures run with sagas off).
* ``noop3`` — three sequential no-op steps: the B5/B5l workflow, the same one DBOS runs.
* ``job`` — one step that calls the job service (``input["url"]``) and waits for it:
  B6 (resilience overhead) and B7 (recovery: a job held long enough to kill the instance).
"""

from __future__ import annotations

from typing import Any

from sync_server.saga.definitions import RetryPolicy, Step, StepContext, Workflow

__all__ = ["ALL", "JOB", "NOOP", "NOOP3"]


async def _noop(ctx: StepContext) -> dict[str, Any]:
    return {}


async def _call_job(ctx: StepContext) -> Any:
    response = await ctx.http.post(
        ctx.input["url"],
        json={"duration": ctx.input.get("duration", 0.05), "key": ctx.idempotency_key},
        headers={"Idempotency-Key": ctx.idempotency_key, "X-Attempt": str(ctx.attempt)},
        timeout=ctx.input.get("timeout", 120.0),
    )
    response.raise_for_status()
    return response.json()


NOOP = Workflow("noop", [Step("only", _noop)])
NOOP3 = Workflow(
    "noop3",
    [
        Step("one", _noop),
        Step("two", _noop, depends_on=["one"]),
        Step("three", _noop, depends_on=["two"]),
    ],
)
JOB = Workflow(
    "job",
    [Step("call", _call_job, timeout=300, retry=RetryPolicy(max_attempts=5, base_delay=0.05))],
)
ALL = [NOOP, NOOP3, JOB]
