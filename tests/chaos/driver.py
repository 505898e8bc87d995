"""The chaos scenario's driver: ``Chaos`` deploys, applies the schedule, heals, checks.

``tests/chaos/scenario.py`` describes the theory of operation; the plan it follows
(fault kinds, schedule, options, report) is in ``tests/chaos/plan.py``.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from tests.chaos.firehose import Firehose
from tests.chaos.plan import (
    HEAVY_RSS_GROWTH,
    HEAVY_SERVER_ENV,
    SLOW_TENANTS,
    TENANTS,
    ChaosOptions,
    ChaosReport,
    Fault,
    schedule,
)
from tests.chaos.slow_reader import SlowReader
from tests.cluster import (
    ClientProc,
    ClientSpec,
    Cluster,
    PrivatePostgres,
    dump_events,
    store_snapshot,
    try_statuses,
    wait_until,
)
from tests.cluster_check import ENDED, ClientRecord, Verdict, check
from tests.cluster_child import workflow_id
from tests.conftest import scaled
from tests.sync_helpers import token


class Chaos:
    """Runs one chaos scenario; see ``tests/chaos/scenario.py``'s docstring."""

    def __init__(self, workdir: Path, options: ChaosOptions) -> None:
        self.workdir = workdir
        self.options = options
        self.report = ChaosReport(options.seed, options.seconds)
        self.run_tag = f"chaos{options.seed}-{uuid.uuid4().hex[:6]}"
        self.pg: PrivatePostgres | None = None
        self.cluster: Cluster | None = None
        self.want_up: dict[int, bool] = {}
        self.next_spawn: dict[int, float] = {}
        self.partitioned: dict[int, int] = {}  # client -> active partitions
        self.log_lines: list[str] = []
        self.readers: list[SlowReader] = []
        self.firehose: Firehose | None = None
        self._sampling = False

    # ------------------------------------------------------------------ helpers
    def log(self, text: str) -> None:
        self.log_lines.append(f"{time.monotonic() - self.t0:7.2f} {text}")

    def fault(self, kind: str, happened: bool) -> None:
        (self.report.faults if happened else self.report.skipped)[kind] += 1

    @property
    def url(self) -> str:
        assert self.pg is not None
        return f"{self.pg.dsn}?schema=tether"

    # ------------------------------------------------------------------ run
    def run(self) -> ChaosReport:
        o = self.options
        started = time.monotonic()
        self.t0 = started
        self.pg = PrivatePostgres().init()
        try:
            self.pg.start()
            self.report.timings["setup postgres"] = time.monotonic() - started
            with Cluster(
                self.workdir,
                self.url,
                instances=o.instances,
                lease=o.lease,
                proxied_clients=True,
                run=self.run_tag,
                seed=o.seed,
                render_timeout=o.render_timeout,
                reconcile=o.reconcile,
                server_env=HEAVY_SERVER_ENV if o.heavy else None,
            ) as cluster:
                self.cluster = cluster
                self._run(cluster)
        finally:
            (self.workdir / "chaos.log").write_text("\n".join(self.log_lines) + "\n")
            self.pg.destroy()
        self.report.timings["total"] = time.monotonic() - started
        return self.report

    def _run(self, cluster: Cluster) -> None:
        o = self.options
        per_client = o.workflows // o.clients
        interval = 0.7 * o.seconds / per_client
        for index in range(o.clients):
            cluster.add_client(
                ClientSpec(
                    index,
                    TENANTS[index % len(TENANTS)],
                    count=per_client,
                    interval=interval,
                    cancel_every=19,
                    faults=True,
                    heavy=o.heavy,
                )
            )
        for client in cluster.clients:
            client.wait_said("STARTED", 60)
        self.want_up = {i: True for i in range(len(cluster.instances))}
        faults = schedule(o.seed, o.seconds, o.clients, o.instances)
        if o.heavy:
            # Client 0 offline for half the window: a backlog of 50..60 KB submits.
            window = o.seconds * 0.8
            faults.append(Fault(0.1 * window, "partition", 0, 0.5 * o.seconds, "both"))
            faults.sort(key=lambda f: f.at)
            self._start_heavy(cluster)
        (self.workdir / "schedule.txt").write_text("\n".join(map(str, faults)) + "\n")
        self.t0 = time.monotonic()
        self._drive(cluster, faults)
        if self.firehose is not None:
            self.firehose.stop()
            self.report.faults["large reports applied"] = self.firehose.applied
        self.report.timings["chaos window"] = time.monotonic() - self.t0
        healed = time.monotonic()
        self._heal(cluster)
        self._settle(cluster, per_client)
        self.report.timings["heal and settle"] = time.monotonic() - healed
        self._check(cluster, per_client)

    # ------------------------------------------------------------------ heavy
    def _start_heavy(self, cluster: Cluster) -> None:
        by_url = {f"ws://127.0.0.1:{i.port}": i for i in cluster.instances}
        urls = list(by_url)

        def generation(url: str) -> int | None:
            instance = by_url[url]
            return instance.starts if instance.alive else None

        for index, tenant in enumerate(SLOW_TENANTS):
            name = f"slow{index}-{self.run_tag}"
            rotated = urls[index:] + urls[:index]
            reader = SlowReader(rotated, token(tenant, name), name, generation=generation)
            self.readers.append(reader.start())
        self.firehose = Firehose(
            f"http://127.0.0.1:{cluster.front_port}",
            token(SLOW_TENANTS[0], "firehose"),
            f"firehose-{self.run_tag}",
            workflow_id(self.run_tag, 1, 0),
        ).start()
        self._sampling = True
        threading.Thread(target=self._sample_rss, args=(cluster,), daemon=True).start()

    def _sample_rss(self, cluster: Cluster) -> None:
        ticks = 0
        while self._sampling:
            ticks += 1
            if ticks % 8 == 0:  # every 2 s: the slow readers' state, for chaos.log
                self.log(
                    "slow readers: "
                    + "; ".join(
                        f"{r.name} {len(r.seqs)} events, {r.connects} connects, "
                        f"closes {dict(r.closes)}"
                        for r in self.readers
                    )
                )
            for instance in cluster.instances:
                pid = instance.pid
                if pid is None or not instance.alive:
                    continue
                with contextlib.suppress(psutil.Error):
                    rss = psutil.Process(pid).memory_info().rss
                    start, peak = self.report.rss.get(instance.name, (rss, rss))
                    self.report.rss[instance.name] = (start, max(peak, rss))
            time.sleep(0.25)

    def _finish_heavy(self, heads: dict[str, int]) -> None:
        for reader, tenant in zip(self.readers, SLOW_TENANTS, strict=True):
            reader.finish(heads.get(tenant, 0))
        for reader in self.readers:
            if not reader.wait(scaled(120)):
                raise AssertionError(f"seed {self.options.seed}: {reader.name} never caught up")
        self._sampling = False
        for reader in self.readers:
            reader.stop()
            self.report.faults["slow_reader_cut"] += reader.server_cuts

    def _check_heavy(self, events: list[Any], verdict: Verdict) -> None:
        tenant_seqs: dict[str, list[int]] = {}
        for event in events:
            tenant_seqs.setdefault(event.tenant, []).append(event.seq)
        problems = []
        for reader, tenant in zip(self.readers, SLOW_TENANTS, strict=True):
            want = tenant_seqs.get(tenant, [])
            if reader.error:
                problems.append(f"{reader.name}: {reader.error}")
            elif reader.seqs != want:
                pairs = zip(reader.seqs, want, strict=False)
                near = next((a for a, b in pairs if a != b), None)
                problems.append(
                    f"{reader.name}: {len(reader.seqs)} events, tenant has {len(want)} "
                    f"(first difference near {near})"
                )
        verdict.add(
            "slow-readers-caught-up",
            problems,
            f"{len(self.readers)} slow readers hold their tenant's whole log "
            f"({sum(r.connects for r in self.readers)} connections, cuts "
            f"{sum((r.closes for r in self.readers), Counter())})",
        )
        problems = [
            f"{name} grew {(peak - start) / 2**20:.0f} MiB ({start / 2**20:.0f} -> "
            f"{peak / 2**20:.0f})"
            for name, (start, peak) in self.report.rss.items()
            if peak - start > HEAVY_RSS_GROWTH
        ]
        verdict.add(
            "server-rss-bounded",
            problems,
            f"every instance within {HEAVY_RSS_GROWTH / 2**20:.0f} MiB of its start",
        )

    # ------------------------------------------------------------------ faults
    def _drive(self, cluster: Cluster, faults: list[Fault]) -> None:
        edges: list[tuple[float, int, str, Fault]] = []
        for n, f in enumerate(faults):
            heapq.heappush(edges, (f.at, n, "begin", f))
        end = self.options.seconds
        while edges or time.monotonic() - self.t0 < end:
            now = time.monotonic() - self.t0
            while edges and edges[0][0] <= now:
                _, n, edge, f = heapq.heappop(edges)
                if edge == "begin":
                    if self._begin(cluster, f):
                        heapq.heappush(edges, (now + f.duration, n, "end", f))
                else:
                    self._end(cluster, f)
            self._supervise(cluster)
            self._check_clients(cluster)
            time.sleep(0.05)

    def _begin(self, cluster: Cluster, f: Fault) -> bool:
        """Apply a fault; returns whether it needs an end edge."""
        self.log(f"begin {f}")
        if f.kind == "client_kill":
            client = cluster.clients[f.target]
            happened = client.kill()
            self.fault(f.kind, happened)
            return happened
        if f.kind in ("instance_kill", "instance_term"):
            instance = cluster.instances[f.target]
            self.want_up[f.target] = False
            if f.kind == "instance_kill":
                happened = instance.kill()
            else:
                happened = instance.alive and instance.terminate(timeout=30) is not None
            self.fault(f.kind, happened)
            return True
        if f.kind == "postgres_restart":
            assert self.pg is not None
            happened = self.pg.kill() if f.detail == "sigkill" else self.pg.stop_immediate()
            self.fault(f.kind, happened)
            return happened
        if f.kind == "partition":
            client = cluster.clients[f.target]
            assert client.proxy is not None
            before = client.proxy.counters()
            client.proxy.call("partition", f.detail)
            self.partitioned[f.target] = self.partitioned.get(f.target, 0) + 1
            self._partition_before = getattr(self, "_partition_before", {})
            self._partition_before[(f.target, f.at)] = before.get("partition_dropped_bytes", 0)
            return True
        if f.kind in ("job_fail", "job_stall"):
            rate = "fail_rate" if f.kind == "job_fail" else "stall_rate"
            self._job_before = getattr(self, "_job_before", {})
            self._job_before[(f.kind, f.at)] = self._job_totals(cluster)
            cluster.jobs.configure(**{rate: float(f.detail)})
            return True
        raise ValueError(f.kind)

    def _end(self, cluster: Cluster, f: Fault) -> None:
        self.log(f"end {f}")
        if f.kind == "client_kill":
            client = cluster.clients[f.target]
            if not client.alive:
                client.start()
        elif f.kind in ("instance_kill", "instance_term"):
            self.want_up[f.target] = True
            self.next_spawn[f.target] = 0.0
        elif f.kind == "postgres_restart":
            assert self.pg is not None
            if not self.pg.running():
                self.pg.start()
        elif f.kind == "partition":
            client = cluster.clients[f.target]
            assert client.proxy is not None
            self.partitioned[f.target] -= 1
            if self.partitioned[f.target] == 0:
                reset = client.proxy.call("heal")
                dropped = client.proxy.counters().get("partition_dropped_bytes", 0)
                before = self._partition_before.pop((f.target, f.at), 0)
                self.fault(f.kind, bool(reset) or dropped > before)
            else:
                self.fault(f.kind, True)  # nested in another partition of the same link
        elif f.kind in ("job_fail", "job_stall"):
            rate = "fail_rate" if f.kind == "job_fail" else "stall_rate"
            cluster.jobs.configure(**{rate: 0.0})
            before = self._job_before.pop((f.kind, f.at))
            after = self._job_totals(cluster)
            index = 0 if f.kind == "job_fail" else 1
            self.fault(f.kind, after[index] > before[index])

    @staticmethod
    def _job_totals(cluster: Cluster) -> tuple[int, int]:
        stats = cluster.jobs.stats()
        return sum(stats["failures"].values()), sum(stats["stalls"].values())

    def _supervise(self, cluster: Cluster) -> None:
        """Respawn instances that should run (one refuses to start while PG is down)."""
        now = time.monotonic()
        for index, instance in enumerate(cluster.instances):
            due = now >= self.next_spawn.get(index, 0.0)
            if self.want_up.get(index) and not instance.alive and due:
                self.log(f"spawn {instance.name}")
                instance.spawn()
                self.next_spawn[index] = now + 1.0

    def _check_clients(self, cluster: Cluster) -> None:
        for client in cluster.clients:
            if client.proc is not None and client.proc.poll() not in (None, -9):
                raise AssertionError(
                    f"seed {self.options.seed}: {client.name} exited by itself with "
                    f"{client.proc.returncode}: {client.log_tail()}"
                )

    # ------------------------------------------------------------------ heal
    def _heal(self, cluster: Cluster) -> None:
        self.log("heal everything")
        assert self.pg is not None
        if not self.pg.running():
            self.pg.start()
        cluster.jobs.configure(fail_rate=0.0, stall_rate=0.0)
        for index, client in enumerate(cluster.clients):
            if client.proxy is not None and self.partitioned.get(index):
                client.proxy.call("heal")
                self.partitioned[index] = 0
            if not client.alive:
                client.start()
        for index in self.want_up:
            self.want_up[index] = True
        deadline = time.monotonic() + scaled(90)
        while not all(i.ready() for i in cluster.instances):
            self._supervise(cluster)
            if time.monotonic() > deadline:
                raise AssertionError(f"instances not ready after heal: {cluster.all_server_logs()}")
            time.sleep(0.1)
        for instance in cluster.instances:
            instance.start()  # records the server id

    def _settle(self, cluster: Cluster, per_client: int) -> None:
        total = per_client * len(cluster.clients)
        for client in cluster.clients:
            self._wait_client(client, "SUBMITTED", 150)

        def all_ended() -> bool:
            counts = try_statuses(self.url)
            if counts is None:
                return False
            ended = sum(n for status, n in counts[0].items() if status in ENDED)
            return ended >= total

        wait_until(all_ended, 180, f"seed {self.options.seed}: every workflow ended")
        counts = try_statuses(self.url)
        assert counts is not None
        heads = counts[1]
        for client in cluster.clients:
            client.finish(heads.get(client.spec.tenant, 0))
        if self.readers:
            self._finish_heavy(heads)
        for client in cluster.clients:
            self._wait_client(client, "FINISHED", 120)

    def _wait_client(self, client: ClientProc, prefix: str, timeout: float) -> None:
        try:
            client.wait_said(prefix, timeout)
        except AssertionError as exc:
            raise AssertionError(f"seed {self.options.seed}: {exc}\n{client.log_tail()}") from exc

    # ------------------------------------------------------------------ check
    def _check(self, cluster: Cluster, per_client: int) -> None:
        job_stats = cluster.jobs.stats()
        events, records = store_snapshot(self.url)
        dump_events(events, self.workdir / "events.jsonl")
        expected = {
            workflow_id(self.run_tag, i, n)
            for i in range(len(cluster.clients))
            for n in range(per_client)
        }
        clients = [
            ClientRecord(c.name, c.spec.tenant, c.path, c.returned()) for c in cluster.clients
        ]
        self.report.verdict = check(
            seed=self.options.seed,
            events=events,
            records=records,
            expected_ids=expected,
            job_stats=job_stats,
            clients=clients,
        )
        if self.options.heavy:
            self._check_heavy(events, self.report.verdict)
        self.report.faults["client reconnects"] = sum(
            sum(1 for _, state, _ in c.connection_log() if state == "up") - c.starts
            for c in cluster.clients
        )
