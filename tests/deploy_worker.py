"""A runner process for rolling-deploy and limit tests:
``python -m tests.deploy_worker --database URL --instance NAME --farm URL --version 1|2``.

Version 1 and version 2 of the ``render`` workflow differ as a real deploy does: v2
renames step ``draw`` to ``paint`` and adds ``publish``. Each step calls the render farm
test double (``tests.render_farm``) with the instance and version in headers, so the
farm's books show which definition ran which step. ``--versions 1,2`` serves both (a
newer build that keeps the old definition for workflows in flight). The ``render`` step
uses the limit ``farm`` (``--concurrency``). Prints ``READY``; SIGTERM stops gracefully,
SIGKILL is a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from sync_server.saga import Limit, RetryPolicy, Step, StepContext, Workflow
from sync_server.saga.alerts import AlertSink
from sync_server.saga.runner import SagaRunner
from sync_server.store import open_store


def render_workflows(farm: str, instance: str, versions: list[str]) -> list[Workflow]:
    """The ``render`` definitions of the given versions ("1", "2"), in that order."""

    def call(version: str):  # type: ignore[no-untyped-def]
        async def step(ctx: StepContext) -> object:
            response = await ctx.http.post(
                f"{farm}/render",
                json={"tenant": ctx.tenant, "duration": ctx.input.get(ctx.step, 0.0)},
                headers={
                    "Idempotency-Key": ctx.idempotency_key,
                    "X-Instance": instance,
                    "X-Version": version,
                },
                timeout=60,
            )
            response.raise_for_status()
            return {"by": instance, "version": version}

        return step

    retry = RetryPolicy(max_attempts=3, base_delay=0.1)
    out = []
    for version in versions:
        step = call(version)
        if version == "1":
            steps = [
                Step("prepare", step, retry=retry),
                Step("draw", step, depends_on=["prepare"], retry=retry, limit="farm"),
                Step("store", step, depends_on=["draw"], retry=retry),
            ]
        else:
            steps = [
                Step("prepare", step, retry=retry),
                Step("paint", step, depends_on=["prepare"], retry=retry, limit="farm"),
                Step("store", step, depends_on=["paint"], retry=retry),
                Step("publish", step, depends_on=["store"], retry=retry),
            ]
        out.append(Workflow("render", steps, version=f"v{version}"))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--farm", required=True)
    parser.add_argument("--versions", default="1")
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--lease", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"{args.instance} %(name)s %(message)s"
    )
    store = open_store(args.database)
    await store.open()
    runner = SagaRunner(
        store,
        render_workflows(args.farm, args.instance, args.versions.split(",")),
        instance_id=args.instance,
        lease_seconds=args.lease,
        poll_interval=0.2,
        alerts=AlertSink(),
        limits={"farm": Limit(concurrency=args.concurrency)},
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
