"""The demo's SDK client process: submits its share of workflows, then converges.

``python -m examples.demo.client --url ws://… --path client-0.db --index 0 --count 10
--seconds 20 --seed 7 --run RUN [--faults]`` (the token in ``TETHER_TOKEN``)

Its plan is deterministic (``plan``): workflow ids are derived from the run, the client
index and the request number, so after a SIGKILL the restarted process walks the same
plan and skips what its SQLite file already holds — what was durable before the kill
is pushed, nothing is submitted twice. It speaks JSON lines on stdout:

* ``{"ready": client_id}``, then ``{"submitted": id}`` after each returned
  ``submit_workflow`` and ``{"status": {...}}`` twice a second (pending, connected);
* ``{"planned": n}`` once every request of the plan is in the local queue;
* on the line ``finish`` on stdin: flush, wait until every local view is final (ended or
  parked, confirmed), print ``{"final": {...}}`` and exit.

The demo reads no counter from here for its report: the report reads the SQLite files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from client_sdk import SyncClient
from client_sdk.backoff import Backoff, CircuitBreaker
from examples.demo.pipeline import DOOMED_FAILURES

__all__ = ["FINAL_STATUSES", "PlannedWorkflow", "main", "plan"]

FINAL_STATUSES = frozenset({"completed", "compensated", "failed", "cancelled", "parked"})
_NAMESPACE = uuid.UUID("6f1d3c3e-7c52-4d55-9a51-0d1f3c7b9e10")


@dataclass(frozen=True, slots=True)
class PlannedWorkflow:
    """One request of a client's plan."""

    id: str
    name: str
    input: dict[str, Any]


def plan(run: str, index: int, count: int, seed: int, faults: bool) -> list[PlannedWorkflow]:
    """The requests client ``index`` makes, the same on every restart.

    Args:
        run: the demo run's id (ids differ between runs).
        index: the client's number.
        count: how many workflows it submits.
        seed: the demo seed.
        faults: whether some renders are doomed to exhaust their attempts (about one
            in eight, and always client 0's middle request, so every run with faults
            has a dead letter to show).

    Returns:
        The planned workflows, in submission order.
    """
    rng = random.Random(f"{seed}/{index}")
    out = []
    for i in range(count):
        hq = rng.random() < 0.35
        doomed = faults and (rng.random() < 0.12 or (index == 0 and i == count // 2))
        render: dict[str, Any] = {"duration": round(rng.uniform(0.3, 1.2), 2)}
        if doomed:
            render["fail_first"] = DOOMED_FAILURES
        out.append(
            PlannedWorkflow(
                id=str(uuid.uuid5(_NAMESPACE, f"{run}/{index}/{i}")),
                name="generate_image_hq" if hq else "generate_image",
                input={
                    "prompt": f"a lighthouse at dusk, variation {index}-{i}",
                    "credits": rng.randint(1, 5),
                    "request": f"{index}/{i}",
                    "render": render,
                },
            )
        )
    return out


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _run(args: argparse.Namespace) -> None:
    client = SyncClient(
        args.url,
        token=args.token,
        path=args.path,
        stall_timeout=5.0,
        backoff=Backoff(base=0.05, cap=0.5),
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.2),
    )
    planned = plan(args.run, args.index, args.count, args.seed, args.faults)
    gap = args.seconds / max(1, args.count)
    rng = random.Random(f"pace/{args.seed}/{args.index}/{time.time()}")
    stdin = await _stdin_lines()
    finish = asyncio.ensure_future(stdin.readline())
    async with client:
        _emit(ready=client.client_id)

        async def heartbeat() -> None:
            while True:
                _emit(status={"pending": client.pending_count, "connected": client.connected})
                await asyncio.sleep(0.5)

        beat = asyncio.create_task(heartbeat())
        for item in planned:
            if client.get_workflow(item.id) is not None:
                continue  # durable before a crash: already queued or on the server
            if finish.done():
                break
            await asyncio.wait({finish}, timeout=rng.uniform(0.5, 1.5) * gap)
            await client.submit_workflow(item.name, item.input, workflow_id=item.id)
            _emit(submitted=item.id)
        _emit(planned=len(planned))
        await finish
        final: dict[str, Any] = {"flushed": True}
        try:
            await client.flush(timeout=args.drain)
        except TimeoutError:
            final["flushed"] = False
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline:
            views = [client.get_workflow(item.id) for item in planned]
            if all(v is None or (v.status in FINAL_STATUSES and not v.pending) for v in views):
                break
            await asyncio.sleep(0.1)
        final["views"] = {
            item.id: (view.status if view is not None else None)
            for item in planned
            if (view := client.get_workflow(item.id)) is not None
        }
        final["pending"] = client.pending_count
        beat.cancel()
        _emit(final=final)


def main(argv: list[str] | None = None) -> None:
    """Run one demo client until told to finish."""
    parser = argparse.ArgumentParser(description="Tether demo client")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default=os.environ.get("TETHER_TOKEN"))
    parser.add_argument("--path", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--run", required=True)
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--faults", action="store_true")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
