"""``sync-server demo``: the main job, end to end, on one machine with no set-up.

Theory of operation
-------------------
``DemoRunner`` creates a temporary folder with an embedded SQLite database and a fresh
auth secret, then starts:

* the **flaky job service** (``examples.job_service``) on loopback, in a thread: random
  job failures and stalls (a stalled render times out and is retried);
* the **server** as a child process (``examples.demo.server``), so it can be
  SIGKILLed and started again on the same port;
* a small **link proxy** (``examples.demo.proxy``) in front of the server, for the
  client that goes offline;
* ``--clients`` **SDK client processes** (``examples.demo.client``), each submitting
  its share of image-generation workflows over ``--seconds`` seconds.

While they submit, faults are injected on a fixed timetable (``_faults``): a job-service
outage (every render fails, so the ``render-service`` breaker opens), a client cut off
and reconnected, a client SIGKILLed and restarted, the server SIGKILLed and restarted,
and a few renders that fail every attempt (their workflows are dead-lettered, then
compensate or park). Then the faults stop, and the demo plays the operator: it requeues
each parked workflow once through ``POST /v1/dlq/{id}/requeue``, waits until every
workflow has ended or parked and every client has flushed and converged, and reads the
report from the server, the job service and the clients' files (``report``).

The live view polls ``GET /v1/admin/overview`` with a global admin token.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live

from examples.demo.live import ClientState, LiveState, render_live, report_table
from examples.demo.processes import ClientProcess, DemoOptions, ServerProcess
from examples.demo.proxy import LinkProxy
from examples.demo.report import (
    FINAL,
    DemoReport,
    Evidence,
    build_report,
    read_client_file,
)
from examples.job_service import JobBooks, JobServiceThread
from protocol import Role
from sync_server.auth import GLOBAL_TENANT, issue_token
from sync_server.service import cancel_and_wait

__all__ = ["DemoOptions", "DemoRunner", "run_demo"]

TENANT = "demo"
FAIL_RATE = 0.12
STALL_RATE = 0.04
STALL_SECONDS = 4.0


class DemoRunner:
    """Runs one demo (see the module docstring).

    Args:
        options: the run's options.
        console: where the live view and the report go.
    """

    def __init__(self, options: DemoOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.state = LiveState()
        self.folder = Path(tempfile.mkdtemp(prefix="tether-demo-"))
        self.secret = secrets.token_urlsafe(48)
        self.admin_token = issue_token(
            self.secret, tenant=GLOBAL_TENANT, subject="demo-operator", role=Role.ADMIN, ttl=3600
        )
        self.books = JobBooks(
            fail_rate=FAIL_RATE if options.faults else 0.0,
            stall_rate=STALL_RATE if options.faults else 0.0,
            stall_seconds=STALL_SECONDS,
        )
        self.books.rng.seed(options.seed)
        self.job: JobServiceThread | None = None
        self.server: ServerProcess | None = None
        self.proxy: LinkProxy | None = None
        self.clients: list[ClientProcess] = []
        self.requeued: set[str] = set()
        self._last_status = 0.0
        self._live: Live | None = None

    # ------------------------------------------------------------------ output
    def _say(self, text: str) -> None:
        line = self.state.note(text)
        if self.options.quiet:
            print(line, flush=True)

    def _status_line(self) -> None:
        if not self.options.quiet or time.monotonic() - self._last_status < 5:
            return
        self._last_status = time.monotonic()
        counts = self.state.overview.get("counts", {})
        breakers = ",".join(
            f"{b['name']}={b['state']}" for b in self.state.overview.get("breakers", [])
        )
        print(
            f"[{self.state.elapsed:5.1f}s] {self.state.phase}: "
            f"submitted {sum(c.submitted for c in self.state.clients)}"
            + "".join(f", {k} {v}" for k, v in sorted(counts.items()))
            + f", retries {self.state.retries}, breakers {breakers or 'closed'}, "
            f"DLQ {self.state.overview.get('metrics', {}).get('dlq_depth', 0)}",
            flush=True,
        )

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(render_live(self.state), refresh=True)
        self._status_line()

    # ------------------------------------------------------------------ run
    async def run(self) -> DemoReport:
        """Run the demo and return its report (the caller decides the exit code)."""
        options = self.options
        if not options.quiet:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        try:
            report = await self._run()
        finally:
            if self._live is not None:
                self._live.stop()
            await self._cleanup()
        return report

    async def _run(self) -> DemoReport:
        options = self.options
        started = time.monotonic()
        self.job = await asyncio.to_thread(JobServiceThread(self.books).start)
        self._say(f"job service on {self.job.url} (fail rate {self.books.fail_rate:.0%})")
        self.server = ServerProcess(self.folder, self.job.url, self.secret)
        await self.server.start()
        self.state.server_up = True
        self._say(f"server on {self.server.http_url}, database {self.server.database}")
        self.proxy = await LinkProxy(self.server.port).start()
        offline_index = 1 if options.clients > 1 else 0
        base, extra = divmod(options.workflows, options.clients)
        shares = [base + (1 if i < extra else 0) for i in range(options.clients)]
        run_id = uuid.uuid4().hex
        for index, count in enumerate(shares):
            via_proxy = options.faults and index == offline_index
            port = self.proxy.port if via_proxy else self.server.port
            state = ClientState(index, via_proxy=via_proxy)
            self.state.clients.append(state)
            token = issue_token(
                self.secret, tenant=TENANT, subject=f"client-{index}", role=Role.CLIENT, ttl=3600
            )
            url = f"ws://127.0.0.1:{port}"
            self.clients.append(
                ClientProcess(index, url, self.folder, token, count, options, run_id, state)
            )
        for client in self.clients:
            await client.start()
        for client in self.clients:
            await client.wait_ready()
        self._say(f"{options.clients} clients submitting {options.workflows} workflows")
        self.state.phase = "submitting"
        async with httpx.AsyncClient(
            base_url=self.server.http_url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=5.0,
        ) as http:
            poller = asyncio.create_task(self._poll(http))
            try:
                if options.faults:
                    await self._faults()
                await self._until(
                    lambda: (
                        all(c.state.planned for c in self.clients)
                        and time.monotonic() - started >= options.seconds
                    ),
                    options.seconds * 3 + 30,
                )
                if options.faults:
                    await self._set_job_faults(0.0, 0.0)
                    self._say("faults stop; the operator requeues parked workflows")
                self.state.phase = "draining"
                await self._drain(http)
                self.state.phase = "converging"
                await asyncio.gather(
                    *(c.finish(options.drain_timeout / 2 + 10) for c in self.clients)
                )
                self.state.phase = "report"
                evidence = await self._collect(http, time.monotonic() - started)
            finally:
                await cancel_and_wait(poller)
        return build_report(evidence)

    async def _until(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.1)
        return False

    # ------------------------------------------------------------------ faults
    async def _set_job_faults(self, fail_rate: float, stall_rate: float) -> None:
        assert self.job is not None
        async with httpx.AsyncClient(timeout=5.0) as http:
            await http.post(
                f"{self.job.url}/config", json={"fail_rate": fail_rate, "stall_rate": stall_rate}
            )

    async def _faults(self) -> None:
        """The fault timetable (relative to the submission window)."""
        window = self.options.seconds
        assert self.server is not None and self.proxy is not None
        begun = time.monotonic()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, begun + fraction * window - time.monotonic()))

        await at(0.15)
        outage = max(2.0, 0.1 * window)
        self._say(f"fault: job service outage for {outage:.1f}s (every render fails)")
        await self._set_job_faults(1.0, STALL_RATE)
        await asyncio.sleep(outage)
        await self._set_job_faults(FAIL_RATE, STALL_RATE)
        self._say("job service back")

        offline = next(c for c in self.clients if c.state.via_proxy)
        await at(0.3)
        self.proxy.go_offline()
        offline.state.offline = True
        self._say(f"fault: client {offline.index} offline (its link is cut)")
        offline_for = max(2.0, 0.2 * window)
        await asyncio.sleep(offline_for)
        self.proxy.go_online()
        offline.state.offline = False
        self._say(
            f"client {offline.index} back online after {offline_for:.1f}s "
            f"({offline.state.pending} queued meanwhile)"
        )

        victim = self.clients[0]
        await at(0.45)
        await self.server.kill()
        self.state.server_up = False
        self.state.retries_before_restart = self.state.retries
        self.state.overview = {**self.state.overview, "metrics": {}}
        self._say("fault: server SIGKILLed")
        # The clients queue their submits meanwhile: kill one with some still queued.
        await self._until(lambda: victim.state.pending > 0, 3.0)
        pending = victim.state.pending
        await victim.kill()
        self._say(f"fault: client {victim.index} SIGKILLed ({pending} submits still queued)")
        await asyncio.sleep(0.4)
        await self.server.start()
        self.state.server_up = True
        self.state.server_restarts += 1
        self._say("server restarted (same database, same port)")
        await victim.start()
        await victim.wait_ready()
        self._say(f"client {victim.index} restarted on the same SQLite file")

    # ------------------------------------------------------------------ poll, drain
    async def _poll(self, http: httpx.AsyncClient) -> None:
        while True:
            try:
                response = await http.get("/v1/admin/overview", params={"limit": 200})
                if response.status_code == 200:
                    self.state.overview = response.json()
            except httpx.HTTPError:
                pass
            self._refresh()
            await asyncio.sleep(0.25)

    async def _drain(self, http: httpx.AsyncClient) -> None:
        """Requeue parked workflows once each; wait until everything ended and synced."""
        deadline = time.monotonic() + self.options.drain_timeout
        while time.monotonic() < deadline:
            try:
                if await self._requeue_parked(http) == 0 and await self._settled(http):
                    return
            except httpx.HTTPError:
                pass  # the server is restarting: ask again
            await asyncio.sleep(0.25)
        self._say("drain timed out: some workflows did not end in time")

    async def _requeue_parked(self, http: httpx.AsyncClient) -> int:
        entries = (await http.get("/v1/dlq", params={"status": "open"})).json()["entries"]
        done = 0
        for entry in entries:
            workflow_id = entry["workflow_id"]
            if workflow_id in self.requeued:
                continue
            view = (await http.get(f"/v1/workflows/{workflow_id}")).json()
            if view.get("status") != "parked":
                continue
            response = await http.post(f"/v1/dlq/{entry['id']}/requeue")
            if response.status_code == 202:
                self.requeued.add(workflow_id)
                done += 1
                self._say(f"operator: requeued dead letter {entry['id']} ({workflow_id[:8]})")
        return done

    async def _settled(self, http: httpx.AsyncClient) -> bool:
        clients = all(
            c.state.planned and c.state.pending == 0 and not c.state.offline and not c.state.killed
            for c in self.clients
        )
        if not clients:
            return False
        listed = (await http.get("/v1/workflows", params={"limit": 10_000})).json()["workflows"]
        return all(w["status"] in FINAL for w in listed)

    # ------------------------------------------------------------------ report
    async def _collect(self, http: httpx.AsyncClient, seconds: float) -> Evidence:
        workflows = (await http.get("/v1/workflows", params={"limit": 10_000})).json()["workflows"]
        events: list[dict[str, Any]] = []
        cursor = 0
        while True:
            page = (await http.get("/v1/pull", params={"cursor": cursor, "limit": 1000})).json()
            events.extend(page["events"])
            cursor = page["cursor"]
            if not page["has_more"]:
                break
        dead = (await http.get("/v1/dlq", params={"status": "all"})).json()["entries"]
        assert self.job is not None
        job_stats = (await http.get(f"{self.job.url}/stats")).json()
        clients = [read_client_file(c.path) for c in self.clients]
        return Evidence(
            clients=clients,
            workflows=workflows,
            events=events,
            dead_letters=dead,
            job_stats=job_stats,
            seconds=seconds,
            faults=[text for _, text in self.state.faults],
        )

    async def _cleanup(self) -> None:
        for client in self.clients:
            await client.abort()
        if self.server is not None:
            await self.server.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        if self.job is not None:
            await asyncio.to_thread(self.job.stop)


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo, print the report, and return the exit code (0: nothing lost).

    Args:
        options: the run's options.
        console: where to print (stdout by default).

    Returns:
        0 if nothing was lost or duplicated and every workflow ended; 1 otherwise.
    """
    console = console or Console(highlight=False)
    runner = DemoRunner(options, console)
    try:
        report = asyncio.run(runner.run())
    except RuntimeError as exc:
        print(f"sync-server: error: demo failed: {exc}", file=sys.stderr)
        print(f"demo files kept in {runner.folder}", file=sys.stderr)
        return 2
    if options.quiet:
        for measure, value, source in report.rows():
            print(f"{measure:>24}: {value:>8}   ({source})")
    else:
        console.print(report_table(report))
    print(report.line(), flush=True)
    if report.ok and not options.keep:
        shutil.rmtree(runner.folder, ignore_errors=True)
    else:
        print(f"demo files kept in {runner.folder}", flush=True)
    return 0 if report.ok else 1
