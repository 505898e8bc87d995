"""The SLOs of a known mix of outcomes, retries and an outage, driven through the demo's
job service (``examples/job_service.py``) by a real server, checked against counts made
independently: from the mix itself, from the job service's books, and from the log with
code of this test's own (``_count``), not ``sync_server.slo``'s."""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict

import httpx
import pytest

from examples.image_pipeline import build_pipeline
from examples.job_service import running_job_service
from sync_server import create_app
from sync_server.saga import RetryPolicy
from sync_server.saga.machine import idempotency_key
from sync_server.slo import ALL
from sync_server.slo_reader import current_slos
from tests.conftest import wait_for
from tests.servers import SECRET, running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(120)

FAST = {"duration": 0.02}


async def _push(http, tenant, client_id, renders):
    ids = [str(uuid.uuid4()) for _ in renders]
    mutations = [
        {
            "id": i + 1,
            "name": "submit_workflow",
            "args": {
                "workflow_id": wid,
                "name": "generate_image",
                "input": {"prompt": "p", "render": render},
            },
        }
        for i, (wid, render) in enumerate(zip(ids, renders, strict=True))
    ]
    response = await http.post(
        "/v1/push",
        json={"client_id": client_id, "mutations": mutations},
        headers={"Authorization": f"Bearer {token(tenant, client_id)}"},
    )
    assert response.status_code == 200, response.text
    return ids


async def _tenant(store, wid):
    """The tenant of a workflow id (each id here is a fresh UUID: one tenant holds it)."""
    [tenant] = await store.workflow_tenants(wid)
    return tenant


async def _record(store, wid):
    return await store.get_workflow(await _tenant(store, wid), wid)


async def _all_ended(store, ids):
    async def done():
        records = [await _record(store, wid) for wid in ids]
        return all(r is not None and r.status in ("completed", "compensated") for r in records)

    async def statuses():
        return {wid: (await _record(store, wid)).status for wid in ids}

    try:
        await wait_for(done, timeout=60)
    except AssertionError:
        raise AssertionError(await statuses()) from None


def _count(history: dict[str, list]) -> dict[str, float]:
    """The six figures, counted straight from each workflow's own events."""
    ended, completed_in_time, durations, recoveries = 0, 0, [], []
    clients, failing = set(), set()
    steps_ran, heavy = 0, 0
    wall = work = 0.0
    for events in history.values():
        submitted = next(e for e in events if e.type == "workflow.submitted")
        client = submitted.data["client_id"]
        clients.add(client)
        final = [e for e in events if e.type == "workflow.status"][-1]
        status = final.data["status"]
        ended += status in ("completed", "compensated", "failed")
        if status in ("compensated", "failed", "parked"):
            failing.add(client)
        by_step = defaultdict(list)
        for e in events:
            if e.type == "step.status":
                by_step[e.data["step"]].append(e)
        for step_events in by_step.values():
            attempts = max(e.data["attempt"] for e in step_events)
            if attempts:
                steps_ran += 1
                heavy += attempts > 4
            failed_at = None
            for e in step_events:
                if e.data["status"] == "retrying" and failed_at is None:
                    failed_at = e.at
                if e.data["status"] == "succeeded" and failed_at is not None:
                    recoveries.append(e.at - failed_at)
                    failed_at = None
        if status == "completed":
            took = final.at - submitted.at
            durations.append(took)
            completed_in_time += took <= 86_400
            wall += took
            # The pipeline's steps run one after another: work is a plain sum of the
            # succeeded attempts' last running → succeeded spans.
            for step_events in by_step.values():
                ok = [e for e in step_events if e.data["status"] == "succeeded"]
                if ok:
                    start = [
                        e.at
                        for e in step_events
                        if e.data["status"] == "running"
                        and e.data["attempt"] == ok[0].data["attempt"]
                    ][-1]
                    work += ok[0].at - start
    durations.sort()
    return {
        "completion_24h": completed_in_time / ended,
        "mttr": sum(recoveries) / len(recoveries),
        "mttr_samples": len(recoveries),
        "client_failure_share": len(failing) / len(clients),
        "p95_completion": durations[math.ceil(0.95 * len(durations)) - 1],
        "retry_efficiency": heavy / steps_ran,
        "steps": steps_ran,
        "overhead": (wall - work) / wall,
    }


async def test_slos_of_a_known_mix_match_independent_counts(sqlite_url):
    with running_job_service() as jobs:
        pipeline = build_pipeline(
            jobs.url,
            render_retry=RetryPolicy(max_attempts=8, base_delay=0.05, max_delay=0.2),
            breaker=None,
        )
        app = create_app(sqlite_url, workflows=[pipeline], auth_secret=SECRET)
        async with running(app) as server, httpx.AsyncClient(base_url=server.http_url) as http:
            tether = app.state.tether
            store = tether.store
            started = time.time()
            ids = []
            ids += await _push(http, "acme", "c1", [FAST, FAST, FAST])
            ids += await _push(http, "acme", "c2", [{**FAST, "fail_first": 2}] * 2 + [FAST])
            doomed = await _push(http, "acme", "c3", [{**FAST, "fail_always": True}, FAST])
            ids += doomed
            doomed = doomed[:1]
            ids += await _push(http, "acme", "c4", [{**FAST, "fail_first": 4}])
            await _all_ended(store, ids)
            # An outage of the job service: every render fails until it is back.
            await http.post(f"{jobs.url}/config", json={"fail_rate": 1.0})
            outage = await _push(http, "beta", "c5", [FAST, FAST])
            keys = [idempotency_key(wid, "render", tenant="beta") for wid in outage]
            await wait_for(lambda: all(jobs.books.failures[k] >= 2 for k in keys), timeout=30)
            await http.post(f"{jobs.url}/config", json={"fail_rate": 0.0})
            ids += outage
            await _all_ended(store, ids)

            now = time.time()
            slos = await current_slos(store, now, now - started + 1)
            overall = {v.name: v for v in slos if v.tenant == ALL and v.workflow == ALL}
            history = {
                wid: await store.read_workflow_events(await _tenant(store, wid), wid) for wid in ids
            }
            counted = _count(history)

            # From the mix: 11 workflows, one compensated; c3 of five clients saw it.
            assert len(ids) == 11
            assert overall["completion_24h"].value == pytest.approx(10 / 11)
            assert overall["completion_24h"].value == pytest.approx(counted["completion_24h"])
            assert overall["client_failure_share"].value == pytest.approx(1 / 5)
            assert counted["client_failure_share"] == pytest.approx(1 / 5)
            # From the job service's books: renders with a 5th attempt or later; steps
            # that ran: 4 per completed workflow, reserve + render for the compensated.
            render_attempts = {
                wid: jobs.books.attempts[
                    idempotency_key(wid, "render", tenant=await _tenant(store, wid))
                ]
                for wid in ids
            }
            assert render_attempts[doomed[0]] == 8
            heavy = sum(1 for n in render_attempts.values() if n > 4)
            assert overall["retry_efficiency"].samples == counted["steps"] == 10 * 4 + 2
            assert overall["retry_efficiency"].value == pytest.approx(heavy / 42)
            assert counted["retry_efficiency"] == pytest.approx(heavy / 42)
            # Recoveries: the renders that failed then succeeded (c2 x2, c4, the outage x2).
            recovered = [w for w, n in render_attempts.items() if n > 1 and w != doomed[0]]
            assert overall["mttr"].samples == counted["mttr_samples"] == len(recovered) == 5
            assert overall["mttr"].value == pytest.approx(counted["mttr"])
            assert 0 < overall["mttr"].value < 30
            # Times, from the log.
            assert overall["p95_completion"].value == pytest.approx(counted["p95_completion"])
            assert overall["overhead"].value == pytest.approx(counted["overhead"])
            assert 0 < overall["overhead"].value < 1
            # Per tenant: beta's client saw no failure, its two renders recovered.
            beta = {v.name: v for v in slos if v.tenant == "beta" and v.workflow == ALL}
            assert beta["client_failure_share"].value == 0.0 and beta["mttr"].samples == 2

            # The monitor: gauges, and slo_burn — 1 failure in 11 spends the 0.1 % budget
            # of completion_24h ~90 times faster than the window allows.
            monitor = tether.monitor
            monitor.slo_window = 24 * (now - started + 1)  # the run fits its 1/24
            monitor.slo_interval = 0.0
            await monitor.check()
            burns = [a for a in tether.alerts.recent if a.kind == "slo_burn"]
            assert any(
                a.details["name"] == "completion_24h" and a.details["tenant"] == ALL for a in burns
            ), burns
            metrics = (await http.get("/metrics")).text
            line = next(
                m
                for m in metrics.splitlines()
                if m.startswith('tether_slo_value{slo="completion_24h",tenant="*",workflow="*"}')
            )
            assert float(line.split()[-1]) == pytest.approx(10 / 11)
