"""Workflows of ``tests/test_tracing.py``'s real servers (``tests.trace_workflows:workflows``).

``traced``: a local step, then a render at the job service named by ``TETHER_JOB_SERVICE``
(through ``ctx.http``, which sends ``traceparent``), retried quickly.
"""

from __future__ import annotations

import os
from typing import Any

from sync_server.saga import RetryPolicy, Step, StepContext, Workflow


async def _prepare(ctx: StepContext) -> dict[str, Any]:
    return {"prepared": True}


async def _render(ctx: StepContext) -> Any:
    ctx.log.info("rendering")  # a JSON log line names the workflow, step, attempt, trace
    response = await ctx.http.post(
        f"{os.environ['TETHER_JOB_SERVICE']}/work",
        json=ctx.input.get("render") or {},
        headers={"Idempotency-Key": ctx.idempotency_key},
    )
    response.raise_for_status()
    return response.json()


workflows = [
    Workflow(
        "traced",
        [
            Step("prepare", _prepare),
            Step(
                "render",
                _render,
                depends_on=["prepare"],
                timeout=30,
                retry=RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=0.5),
            ),
        ],
    )
]
