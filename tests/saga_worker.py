"""A saga runner process for fault tests: ``python -m tests.saga_worker --database URL ...``.

It opens the store and runs ``SagaRunner`` (no HTTP app) with the test workflows until
SIGTERM (graceful: leases released) or SIGKILL (nothing released, as a crash). It prints
``READY`` once running; its log lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from examples.image_pipeline import build_pipeline
from sync_server.saga import RetryPolicy, Step, StepContext, Workflow
from sync_server.saga.alerts import AlertSink
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store


def fault_workflows(job_service: str) -> list[Workflow]:
    """The workflows the fault tests submit."""

    async def job(ctx: StepContext) -> object:
        response = await ctx.http.post(
            f"{job_service}/work",
            json=ctx.input.get("render") or {},
            headers={"Idempotency-Key": ctx.idempotency_key},
        )
        response.raise_for_status()
        return response.json()

    return [
        build_pipeline(
            job_service, render_retry=RetryPolicy(max_attempts=5, base_delay=0.1), breaker=None
        ),
        Workflow("job", [Step("call", job, retry=RetryPolicy(max_attempts=5, base_delay=0.1))]),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--job-service", required=True)
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("--claim-batch", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"{args.instance} %(name)s %(message)s"
    )
    store = open_store(args.database)
    await store.open()
    runner = SagaRunner(
        store,
        fault_workflows(args.job_service),
        instance_id=args.instance,
        lease_seconds=args.lease,
        poll_interval=args.poll,
        claim_batch=args.claim_batch,
        alerts=AlertSink(),
    )
    await runner.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await runner.stop()
    await store.close()
    print(f"STOPPED {runner.stats}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
