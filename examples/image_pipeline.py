"""The example saga: reserve credits -> render on a flaky job service -> store -> charge.

Every step calls the job service (``examples/job_service.py``) with the step's
``idempotency_key``, so the service's books show one effect per key however often a
step is retried or re-run after a crash (SPEC promise 3). Failures compensate: the
render is cancelled and the credits refunded, in reverse dependency order.

``build_pipeline(url)`` makes the workflow for a job service at ``url``; the module-level
``generate_image`` (and ``workflows``, for ``--workflows examples.image_pipeline:workflows``)
uses ``TETHER_JOB_SERVICE`` (default ``http://127.0.0.1:8701``).

Input: ``{"prompt": str, "credits": int, "render": {duration, fail_first, stall_first,
fail_always, ...}}`` — the ``render`` dict is passed to the job service (fault knobs).
"""

from __future__ import annotations

import os
from typing import Any

from sync_server.adapters.job_service import JobService
from sync_server.saga import PermanentError, RetryPolicy, Step, StepContext, Workflow

__all__ = ["build_pipeline", "generate_image", "job_steps", "workflows"]


def build_pipeline(
    url: str,
    *,
    name: str = "generate_image",
    render_timeout: float = 120.0,
    render_retry: RetryPolicy | None = None,
    breaker: str | None = "render-service",
    on_failure: str = "compensate",
) -> Workflow:
    """The image pipeline against the job service at ``url``.

    Args:
        url: base URL of the job service.
        name: the workflow's name.
        render_timeout: seconds per render attempt.
        render_retry: the render's retry policy.
        breaker: circuit breaker name of the render service (None: no breaker).
        on_failure: ``"compensate"`` or ``"park"``.

    Returns:
        The ``Workflow``.
    """

    async def effect(ctx: StepContext, kind: str, key: str | None = None) -> Any:
        response = await ctx.http.post(
            f"{url}/effects/{kind}", headers={"Idempotency-Key": key or ctx.idempotency_key}
        )
        response.raise_for_status()
        return response.json()

    async def reserve_credits(ctx: StepContext) -> dict[str, Any]:
        credits = ctx.input.get("credits", 1)
        if not isinstance(credits, int) or credits < 0:
            raise PermanentError(f"credits must be a non-negative integer, not {credits!r}")
        await effect(ctx, "reserve")
        return {"reservation": ctx.idempotency_key, "credits": credits}

    async def refund(ctx: StepContext) -> None:
        await effect(ctx, "refund", ctx.results[ctx.step]["reservation"])

    async def render(ctx: StepContext) -> dict[str, Any]:
        # Look the job up first, attach to a running one, submit only if unknown
        # (sync_server.adapters.keyed): a re-run attempt never starts a second render.
        body = {"prompt": ctx.input.get("prompt", ""), **(ctx.input.get("render") or {})}
        service = JobService(url, http=ctx.http)
        data: dict[str, Any] = await service.run_job(ctx, body, timeout=render_timeout)
        return {"job_id": data["job_id"], "image": data["result"]}

    async def cancel_job(ctx: StepContext) -> None:
        await effect(ctx, "cancel", ctx.results[ctx.step]["job_id"])

    async def store(ctx: StepContext) -> dict[str, Any]:
        await effect(ctx, "store")
        return {"url": f"https://images.example/{ctx.workflow_id}.png"}

    async def charge(ctx: StepContext) -> dict[str, Any]:
        await effect(ctx, "charge")
        return {"charged": ctx.results["reserve_credits"]["credits"]}

    return Workflow(
        name,
        steps=[
            Step("reserve_credits", reserve_credits, compensate=refund),
            Step(
                "render",
                render,
                depends_on=["reserve_credits"],
                compensate=cancel_job,
                timeout=render_timeout,
                retry=render_retry
                or RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=30, multiplier=2),
                breaker=breaker,
            ),
            Step("store", store, depends_on=["render"]),
            Step("charge", charge, depends_on=["store", "reserve_credits"]),
        ],
        on_failure=on_failure,  # type: ignore[arg-type]
    )


generate_image = build_pipeline(os.environ.get("TETHER_JOB_SERVICE", "http://127.0.0.1:8701"))
workflows = [generate_image]
job_steps = {"generate_image": "render"}
"""The step whose job runs at the job service (what reconciliation compares)."""
