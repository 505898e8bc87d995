"""B6 — resilience overhead: a one-step workflow that calls the job service, through the
SDK and the server, against calling the job service directly with httpx.

Children: the job service (``bench.serve jobs``: ``examples.job_service`` with faults
off) and one Tether instance (SQLite, sagas on). Each repeat runs in a fresh worker
process: an SDK client (connected, synced) submits a ``job`` workflow and waits for its
terminal view, one at a time; the raw limit is the same number of direct ``httpx`` calls
to the same endpoint from a worker of its own. Figures: extra time in % of the direct
call for a 1 s job, extra milliseconds (p50) for a 50 ms job.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.procs import SECRET, child, run_worker

__all__ = ["direct_calls", "sdk_calls"]


async def direct_calls(job_url: str, duration: float, count: int) -> list[float]:
    """Worker: ``count`` sequential direct calls; seconds each."""
    import httpx

    times = []
    async with httpx.AsyncClient(timeout=120) as http:
        await http.post(
            job_url, json={"duration": 0.0}, headers={"Idempotency-Key": uuid.uuid4().hex}
        )
        for _ in range(count):
            start = time.perf_counter()
            response = await http.post(
                job_url,
                json={"duration": duration},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            response.raise_for_status()
            times.append(time.perf_counter() - start)
    return times


async def sdk_calls(url: str, path: str, job_url: str, duration: float, count: int) -> list[float]:
    """Worker: ``count`` sequential workflows via the SDK, submit → terminal; seconds."""
    import asyncio

    from client_sdk import SyncClient
    from sync_server.auth import issue_token

    token = issue_token(SECRET, tenant="bench-b6", subject="b6")
    times = []
    async with SyncClient(url, token=token, path=path) as client:
        async with asyncio.timeout(30):
            while not client.connected:  # noqa: ASYNC110 (a property: polled)
                await asyncio.sleep(0.01)
        warm = await client.submit_workflow("job", {"url": job_url, "duration": 0.0})
        await client.wait(warm.id, timeout=60)
        for _ in range(count):
            start = time.perf_counter()
            handle = await client.submit_workflow("job", {"url": job_url, "duration": duration})
            view = await client.wait(handle.id, timeout=120)
            times.append(time.perf_counter() - start)
            if view.status != "completed":
                raise RuntimeError(f"workflow ended {view.status}: {view.error}")
    return times


def _missing() -> str | None:
    try:
        from client_sdk import SyncClient  # noqa: F401
        from sync_server.saga.runner import SagaRunner  # noqa: F401
    except ImportError as exc:
        return f"the SDK or the saga runner cannot be imported ({exc})"
    return None


@figure("B6")
async def b6(ctx: Context) -> list[Row]:
    """Overhead of SDK + server + saga around a job-service call, vs the direct call."""
    missing = _missing()
    if missing:
        return [Row.unavailable("B6", missing, "≤ 5 % on 1 s; ≤ 10 ms p50 on 50 ms")]
    plans = [(1.0, ctx.size(3, 1)), (0.05, ctx.size(20, 5))]
    runs: dict[float, dict[str, list[list[float]]]] = {
        d: {"sdk": [], "direct": []} for d, _ in plans
    }
    url = f"sqlite:///{ctx.path('b6.db')}"
    async with (
        child("jobs", [], logdir=ctx.workdir) as jobs,
        child("tether", ["--database", url, "--run-sagas"], logdir=ctx.workdir) as server,
    ):
        job_url = f"{jobs.http_url}/work"
        for i in range(ctx.repeats):
            for duration, count in plans:
                ctx.say(f"B6 {duration:g} s job x {count}, repeat {i + 1}/{ctx.repeats}")
                params: dict[str, Any] = {"job_url": job_url, "duration": duration, "count": count}
                runs[duration]["direct"].append(
                    await run_worker("bench.resilience:direct_calls", params, logdir=ctx.workdir)
                )
                runs[duration]["sdk"].append(
                    await run_worker(
                        "bench.resilience:sdk_calls",
                        {**params, "url": server.ws_url, "path": str(ctx.path("b6-client.db"))},
                        logdir=ctx.workdir,
                    )
                )
    rows = []
    long_sdk = Stat.of([percentile(r, 50) for r in runs[1.0]["sdk"]], "s")
    long_direct = Stat.of([percentile(r, 50) for r in runs[1.0]["direct"]], "s")
    extra = Stat.of(
        [
            (percentile(s, 50) / percentile(d, 50) - 1) * 100
            for s, d in zip(runs[1.0]["sdk"], runs[1.0]["direct"], strict=True)
        ],
        "%",
    )
    rows.append(
        Row(
            "B6",
            "1 s job via SDK + server: extra over the direct call",
            tether=extra,
            raw=long_direct,
            raw_label="direct httpx call (p50)",
            ratio=ratio(long_sdk, long_direct),
            target="≤ 5 %",
            passed=verdict(ctx, extra.median <= 5),
            details={"sdk_p50_s": long_sdk.to_json()},
        )
    )
    short_sdk = Stat.of([percentile(r, 50) * 1000 for r in runs[0.05]["sdk"]], "ms")
    short_direct = Stat.of([percentile(r, 50) * 1000 for r in runs[0.05]["direct"]], "ms")
    extra_ms = Stat.of(
        [
            (percentile(s, 50) - percentile(d, 50)) * 1000
            for s, d in zip(runs[0.05]["sdk"], runs[0.05]["direct"], strict=True)
        ],
        "ms",
    )
    rows.append(
        Row(
            "B6",
            "50 ms job via SDK + server: extra p50",
            tether=extra_ms,
            raw=short_direct,
            raw_label="direct httpx call (p50)",
            ratio=ratio(short_sdk, short_direct),
            target="≤ 10 ms",
            passed=verdict(ctx, extra_ms.median <= 10),
            details={"sdk_p50_ms": short_sdk.to_json()},
        )
    )
    return rows
