"""A multi-step generation on emp-job-queue: prompt -> render -> upscale, with compensation.

Each step is one queue job of the same generation (``workflow_id`` = the Tether workflow
id, ``current_step``/``total_steps`` = its place in the generation), run through
``EmpJobQueue.run_job`` so that a crashed instance, a dropped queue connection, an API
restart or a dead worker never loses a job nor runs one twice. If a step fails for good,
the completed steps are compensated in reverse order: a job still live is cancelled
(``cancel_job``) and a ``cleanup`` job removes what it produced.

Serve it (the queue's base URL in ``EMP_JOB_QUEUE_URL``)::

    EMP_JOB_QUEUE_URL=http://queue:3331 sync-server serve \\
        --workflows examples.emp_pipeline:workflows --sources examples.emp_pipeline:sources

Environment: ``EMP_JOB_QUEUE_URL`` (default ``http://127.0.0.1:3331``),
``EMP_JOB_QUEUE_TOKEN`` (optional), ``EMP_STUCK_AFTER`` (seconds, default 300).

Input: ``{"prompt": str, "duration": seconds per job (default 1), "fail": step name}``;
``fail`` makes that step's jobs fail (to see compensation).
"""

from __future__ import annotations

import os
from typing import Any

from sync_server.adapters.emp_job_queue import EmpJobQueue
from sync_server.saga import RetryPolicy, Step, StepContext, Workflow

__all__ = ["STEPS", "build_generation", "generation", "queue", "sources", "workflows"]

STEPS = (("prompt", "openai"), ("render", "comfyui"), ("upscale", "comfyui-upscale"))
"""(step name, the queue's ``service_required``), in generation order."""


def build_generation(queue: EmpJobQueue, *, name: str = "emp_generation") -> Workflow:
    """The generation workflow on ``queue``.

    Args:
        queue: the adapter steps run their jobs through.
        name: the workflow's name.

    Returns:
        The ``Workflow``.
    """
    total = len(STEPS)

    def action(index: int, step: str, service: str) -> Any:
        async def run(ctx: StepContext) -> Any:
            payload: dict[str, Any] = {
                "prompt": ctx.input.get("prompt", ""),
                "duration": float(ctx.input.get("duration", 1.0)),
                "inputs": {dep: result for dep, result in ctx.results.items()},
            }
            if ctx.input.get("fail") == step:
                payload |= {"fail": True, "error": f"{service} worker error"}
            return await queue.run_job(
                ctx, service, payload, current_step=index + 1, total_steps=total
            )

        return run

    async def undo(ctx: StepContext) -> None:
        await queue.cancel_job(ctx)  # if the job is somehow still live
        produced = ctx.results.get(ctx.step) or {}
        await queue.run_job(ctx, "cleanup", {"job_id": produced.get("job_id")}, priority=90)

    steps = []
    for index, (step, service) in enumerate(STEPS):
        steps.append(
            Step(
                step,
                action(index, step, service),
                depends_on=[STEPS[index - 1][0]] if index else [],
                compensate=undo,
                timeout=120.0,
                retry=RetryPolicy(max_attempts=3, base_delay=0.2, max_delay=5.0),
            )
        )
    return Workflow(name, steps, on_failure="compensate")


queue = EmpJobQueue(
    os.environ.get("EMP_JOB_QUEUE_URL", "http://127.0.0.1:3331"),
    auth_token=os.environ.get("EMP_JOB_QUEUE_TOKEN") or None,
    stuck_after=float(os.environ.get("EMP_STUCK_AFTER", "300")),
)
generation = build_generation(queue)
workflows = [generation]
sources = [queue]
