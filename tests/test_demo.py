"""``sync-server demo``, small, in a subprocess: its exit code and its report.

The report's numbers come from the server, the job service and the clients' files
(``examples.demo.report``); here they must balance — every submitted workflow is on
the server and ended or parked, nothing lost or duplicated — and the faults the demo
claims to inject must show up in the same run ("sometimes" assertions).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from examples.demo.client import plan
from examples.demo.pipeline import DOOMED_FAILURES, RENDER_ATTEMPTS
from examples.demo.report import ClientFile, Evidence, build_report
from examples.job_service import create_job_service

pytestmark = pytest.mark.timeout(180)


def run_demo(*args: str) -> tuple[int, str, dict[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-m", "sync_server.cli", "demo", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(lines) == 1, output
    report = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", lines[0])}
    return proc.returncode, output, report


def balanced(report: dict[str, float]) -> None:
    ended = sum(report[k] for k in ("completed", "compensated", "parked", "failed", "cancelled"))
    assert report["submitted"] == ended
    assert report["on_server"] == report["submitted"]
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    assert report["unfinished"] == 0
    assert report["diverged"] == 0
    assert report["ok"] == 1


def test_demo_with_faults() -> None:
    code, output, report = run_demo("--workflows", "14", "--clients", "2", "--seconds", "8")
    assert code == 0, output
    assert report["submitted"] == 14, output
    balanced(report)
    # Every fault of the timetable happened in this run.
    for fault in (
        "fault: job service outage",
        "fault: client 1 offline",
        "fault: server SIGKILLed",
        "fault: client 0 SIGKILLed",
        "server restarted",
        "client 0 restarted",
    ):
        assert fault in output, output
    assert report["job_failures"] > 0
    assert report["retries"] > 0
    assert report["dead_letters"] > 0
    # Shutting down with renders still stalled in the job service is clean.
    assert "Traceback" not in output and "CancelledError" not in output, output


@pytest.mark.parametrize("clients", [1, 2, 3])
def test_every_run_with_faults_plans_a_doomed_render(clients: int) -> None:
    """The dead letter the demo reports needs a doomed render in every faulty run, whatever
    the seed and size; a run without faults has none."""
    for seed in range(40):
        for workflows in range(clients, clients + 6):
            base, extra = divmod(workflows, clients)
            counts = [base + (1 if i < extra else 0) for i in range(clients)]

            def fail_first(faults: bool, seed: int = seed, counts: list[int] = counts) -> set[int]:
                return {
                    item.input["render"].get("fail_first", 0)
                    for i, count in enumerate(counts)
                    for item in plan("run", i, count, seed, faults)
                }

            assert DOOMED_FAILURES in fail_first(True), (seed, workflows)
            assert fail_first(False) == {0}, (seed, workflows)


async def test_a_doomed_render_is_dead_lettered_even_if_an_attempt_is_interrupted() -> None:
    """The real job service against a doomed render: a first run whose attempt was cut off
    by the server's SIGKILL (it reached the service, then ran again under the same attempt
    number) still fails all its RENDER_ATTEMPTS; the operator's requeue then succeeds."""
    app = create_job_service()
    body = {"duration": 0.0, "fail_first": DOOMED_FAILURES}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://job") as http:

        async def attempt() -> int:
            headers = {"Idempotency-Key": "w:render"}
            return (await http.post("/work", json=body, headers=headers)).status_code

        interrupted = await attempt()  # the saga never saw its answer
        first_run = [await attempt() for _ in range(RENDER_ATTEMPTS)]
        assert interrupted == 503 and first_run == [503] * RENDER_ATTEMPTS  # dead-lettered
        requeued = [await attempt() for _ in range(RENDER_ATTEMPTS)]
        assert 200 in requeued, requeued  # the requeue succeeds within its attempts


def test_demo_without_faults_completes_everything() -> None:
    code, output, report = run_demo(
        "--workflows", "4", "--clients", "1", "--seconds", "2", "--no-faults"
    )
    assert code == 0, output
    balanced(report)
    assert report["completed"] == report["submitted"] == 4
    assert report["retries"] == report["job_failures"] == report["dead_letters"] == 0
    assert "fault:" not in output
    # The closing report's SLO lines, from the server's log: a clean run meets them.
    assert re.search(r"SLO completion_24h:\s+100\.0%", output), output
    assert re.search(r"SLO retry_efficiency:\s+0\.0%", output), output
    for name in ("mttr", "client_failure_share", "p95_completion", "overhead"):
        assert f"SLO {name}:" in output


def test_report_counts_lost_and_duplicated() -> None:
    """The verdict itself: a submit the server never saw is lost, a request that became
    two workflows or a key applied twice is duplicated."""
    workflow = {"id": "a", "status": "completed", "steps": {}}
    evidence = Evidence(
        clients=[ClientFile(submitted={"a", "b"}, views={"a": "completed"})],
        workflows=[workflow, {"id": "c", "status": "running", "steps": {}}],
        events=[
            {"type": "workflow.submitted", "data": {"input": {"request": "0/1"}}},
            {"type": "workflow.submitted", "data": {"input": {"request": "0/1"}}},
            {"type": "step.status", "data": {"status": "retrying"}},
        ],
        dead_letters=[],
        job_stats={"effects": {"a:render": 2}, "ledger": {"reserve": {"a:r": 1, "a:q": 1}}},
        seconds=1.0,
    )
    report = build_report(evidence)
    assert (report.lost, report.duplicated, report.unfinished, report.retries) == (1, 3, 1, 1)
    assert not report.ok
    assert "lost=1" in report.line() and "ok=0" in report.line()
