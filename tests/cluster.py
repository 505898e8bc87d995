"""A whole Tether deployment in child processes, for load-balancer and chaos tests.

Theory of operation
-------------------
``Cluster`` owns, in one temporary folder:

* N ``sync-server serve`` instances (``Instance``) on one PostgreSQL — the shared one
  with a private schema, or a ``PrivatePostgres`` cluster the test may kill — each on a
  fixed port so that it can be restarted behind the same address;
* HAProxy in front of them, from the shipped ``deploy/haproxy.cfg`` (``tests/lb.py``);
* the job service (``tests/cluster_child.py job-service``) in a child process; its
  books are read over ``GET /stats``, its fault rates set over ``POST /config``;
* K SDK clients (``ClientProc``), each a child process with its own SQLite file, an
  optional ``BackgroundProxy`` fault proxy on its link, a side file of every returned
  mutation (the history) and a status file of its connects and disconnects.

Helpers kill (SIGKILL), drain (SIGTERM) and restart instances and clients, stop and
start PostgreSQL, and wait on conditions with deadlines — never fixed sleeps. The
checker (``tests/cluster_check.py``) then decides from the records alone.

Nothing here stops or restarts the machine's shared PostgreSQL: ``PrivatePostgres``
is an ``initdb`` cluster in a folder owned by the ``postgres`` user (LESSONS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.cluster_child import SideFile
from tests.conftest import scaled
from tests.faultproxy import BackgroundProxy
from tests.lb import haproxy
from tests.servers import SECRET, free_port
from tests.sync_helpers import token

ROOT = Path(__file__).resolve().parent.parent


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian layout; 15 on these machines)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def wait_until(predicate: Callable[[], Any], timeout: float, message: str, interval=0.05) -> Any:
    """Poll ``predicate`` until truthy; AssertionError after ``timeout`` (scaled) seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {message}")
        time.sleep(interval)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ PostgreSQL


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temporary folder owned by ``postgres``.

    ``initdb``/``pg_ctl`` refuse to run as root, so they run through ``runuser -u
    postgres`` (as root) or directly (as any other user). The superuser is ``root``
    with trust authentication on 127.0.0.1 only.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.dir.chmod(0o700)
        self.pid: int | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, check=check, timeout=120
        )

    def init(self) -> PrivatePostgres:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries (initdb) not found in {PG_BIN}")
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "-N"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            # A test cluster: no fsync (speed), small, quick to stop.
            conf.write("fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
        return self

    def start(self) -> None:
        result = self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n")[0])

    def kill(self) -> bool:
        """SIGKILL the postmaster and wait until it is gone. True if it was running."""
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            return False
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pid), 30, "postmaster gone after SIGKILL")
        # Its backends notice the postmaster's death and exit; the next start waits for
        # them through the shared-memory check, so only the postmaster pid matters here.
        self.pid = None
        return True

    def stop_immediate(self) -> bool:
        if self.pid is None or not _pid_alive(self.pid):
            return False
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        self.pid = None
        return True

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    def destroy(self) -> None:
        if self.running():
            self._run(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False
            )
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------ processes


class Instance:
    """One ``sync-server serve`` child process on a fixed port (restartable)."""

    def __init__(
        self, name: str, port: int, database_url: str, env: dict[str, str], lease: float, log: Path
    ) -> None:
        self.name = name
        self.port = port
        self.database_url = database_url
        self.env = env
        self.lease = lease
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_ids: list[str] = []
        """Every server id this instance had (one per start), for the event log."""
        self.starts = 0
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        cmd = [
            sys.executable,
            "-m",
            "sync_server.cli",
            "serve",
            "--port",
            str(self.port),
            "--database",
            self.database_url,
            "--workflows",
            "tests.cluster_child:workflows",
            "--lease",
            str(self.lease),
            "--log-level",
            "warning",
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n---- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=_child_env(self.env), stdout=log, stderr=log
            )
        self.starts += 1

    def ready(self) -> str | None:
        """The server id if ``/readyz`` answers 200, else None."""
        try:
            response = httpx.get(f"{self.url}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        server_id: str = response.json()["server_id"]
        return server_id

    def start(self, timeout: float = 60) -> str:
        """Spawn and wait until ready (respawning if it exits, e.g. the database is down)."""
        deadline = time.monotonic() + scaled(timeout)
        if not self.alive:
            self.spawn()
        while True:
            server_id = self.ready()
            if server_id:
                if server_id not in self.server_ids:
                    self.server_ids.append(server_id)
                return server_id
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready within {timeout} s: {self.tail()}")
            if not self.alive:
                self.spawn()  # e.g. the database was down at start-up: try again
            time.sleep(0.1)

    def kill(self) -> bool:
        """SIGKILL; True if it was running."""
        if not self.alive:
            return False
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        return True

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM (graceful drain) and wait for the exit; returns the exit code."""
        if not self.alive:
            return None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not drain within {timeout} s") from None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class JobService:
    """The job service child process; books over HTTP."""

    def __init__(self, port: int, log: Path, seed: int = 7, stall: float = 4.0) -> None:
        self.port = port
        self.log_path = log
        self.seed = seed
        self.stall = stall
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tests.cluster_child",
            "job-service",
            "--port",
            str(self.port),
            "--seed",
            str(self.seed),
            "--stall",
            str(self.stall),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=log)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"job service exited: {self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/stats", timeout=2).status_code == 200
            return False

        wait_until(up, 30, "job service up")

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/stats", timeout=30)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def configure(self, **rates: float) -> None:
        httpx.post(f"{self.url}/config", json=rates, timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class ClientSpec:
    index: int
    tenant: str
    count: int
    interval: float
    cancel_every: int = 0
    faults: bool = False
    heavy: bool = False


@dataclass
class ClientProc:
    """One SDK client child process (restartable) and its files."""

    spec: ClientSpec
    url: str
    workdir: Path
    run: str
    seed: int
    proxy: BackgroundProxy | None = None
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    client_id: str | None = None
    starts: int = 0
    _reader: Any = None

    @property
    def name(self) -> str:
        return f"client{self.spec.index}"

    @property
    def path(self) -> Path:
        return self.workdir / f"{self.name}.db"

    @property
    def returned_path(self) -> Path:
        return self.workdir / f"{self.name}.returned"

    @property
    def status_path(self) -> Path:
        return self.workdir / f"{self.name}.status"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive
        cmd = [
            sys.executable,
            "-m",
            "tests.cluster_child",
            "client",
            "--url",
            self.url,
            "--token",
            token(self.spec.tenant, self.name),
            "--path",
            str(self.path),
            "--returned",
            str(self.returned_path),
            "--status",
            str(self.status_path),
            "--index",
            str(self.spec.index),
            "--count",
            str(self.spec.count),
            "--run",
            self.run,
            "--seed",
            str(self.seed),
            "--interval",
            str(self.spec.interval),
            "--cancel-every",
            str(self.spec.cancel_every),
        ]
        if self.spec.faults:
            cmd.append("--faults")
        if self.spec.heavy:
            cmd.append("--heavy")
        log = (self.workdir / f"{self.name}.log").open("a")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        self.starts += 1
        self.lines = []
        import threading

        proc = self.proc

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.strip())

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def said(self, prefix: str) -> str | None:
        return next((line for line in self.lines if line.startswith(prefix)), None)

    def wait_said(self, prefix: str, timeout: float) -> str:
        def check() -> str | None:
            line = self.said(prefix)
            if line is None and not self.alive and self._reader is not None:
                self._reader.join(1)
                line = self.said(prefix)
                if line is None:
                    raise AssertionError(
                        f"{self.name} exited ({self.proc and self.proc.returncode}) before "
                        f"{prefix!r}: {self.log_tail()}"
                    )
            return line

        return wait_until(check, timeout, f"{self.name} says {prefix}")

    def kill(self) -> bool:
        """SIGKILL; True if it was running."""
        was = self.alive
        if self.proc is not None:
            if was:
                self.proc.kill()
            self.proc.wait(timeout=30)
            self._close_pipes()
        return was

    def _close_pipes(self) -> None:
        assert self.proc is not None
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def finish(self, seq: int) -> None:
        """Ask the client to catch up to ``seq``, flush and close."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"finish {seq}\n")
        self.proc.stdin.flush()

    def returned(self) -> list[tuple[str, str]]:
        return SideFile.read(str(self.returned_path))

    def connection_log(self) -> list[tuple[float, str, str]]:
        out = []
        with contextlib.suppress(FileNotFoundError), self.status_path.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    out.append((float(parts[0]), parts[1], parts[2]))
        return out

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / f"{self.name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


# ------------------------------------------------------------------ the cluster


class Cluster:
    """Instances behind HAProxy, the job service, and SDK client processes.

    Args:
        workdir: a folder for logs, client files and the HAProxy config.
        database_url: the PostgreSQL URL every instance uses (with ``?schema=``).
        instances: how many ``sync-server serve`` processes.
        lease: saga lease seconds (``--lease``).
        proxied_clients: put a ``BackgroundProxy`` on each client's link.
        run: a tag that makes this run's workflow ids unique.
        seed: seeds workflow inputs and client pacing.
    """

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        *,
        instances: int = 2,
        lease: float = 2.0,
        proxied_clients: bool = False,
        run: str = "run",
        seed: int = 1,
        render_timeout: float = 2.5,
        job_stall: float = 4.0,
        reconcile: bool = False,
        server_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.lease = lease
        self.run = run
        self.seed = seed
        self.proxied_clients = proxied_clients
        self.jobs = JobService(free_port(), workdir / "job-service.log", seed, job_stall)
        env = {
            "SYNC_AUTH_SECRET": SECRET,
            "TETHER_JOB_SERVICE": self.jobs.url,
            "TETHER_RENDER_TIMEOUT": str(render_timeout),
            **(server_env or {}),
        }
        self.instances = [
            Instance(f"s{i}", free_port(), database_url, env, lease, workdir / f"s{i}.log")
            for i in range(instances)
        ]
        if reconcile:  # the sweep asks the job service about every running render
            for instance in self.instances:
                instance.extra_args = [
                    "--sources",
                    "tests.cluster_child:sources",
                    "--job-step",
                    "generate_image=render",
                ]
        self.front_port = free_port()
        self.clients: list[ClientProc] = []
        self._stack = contextlib.ExitStack()

    @property
    def front_url(self) -> str:
        return f"ws://127.0.0.1:{self.front_port}"

    def __enter__(self) -> Cluster:
        try:
            self.jobs.start()
            self._stack.callback(self.jobs.stop)
            self._stack.callback(self._stop_processes)
            for instance in self.instances:
                instance.spawn()
            for instance in self.instances:
                instance.start()
            self._stack.enter_context(
                haproxy(self.front_port, [i.port for i in self.instances], self.workdir)
            )
            wait_until(self._front_ready, 30, "HAProxy routes to a ready instance")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _front_ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            url = f"http://127.0.0.1:{self.front_port}/readyz"
            return httpx.get(url, timeout=2).status_code == 200
        return False

    def _stop_processes(self) -> None:
        for client in self.clients:
            client.kill()  # (their proxies are stopped by their own callbacks)
        for instance in self.instances:
            if instance.alive:
                with contextlib.suppress(Exception):
                    instance.terminate(timeout=20)
            instance.kill()

    # -------------------------------------------------------------- clients
    def add_client(self, spec: ClientSpec) -> ClientProc:
        url = self.front_url
        proxy = None
        if self.proxied_clients:
            proxy = BackgroundProxy(("127.0.0.1", self.front_port), seed=spec.index).start()
            self._stack.callback(proxy.stop)
            url = f"ws://127.0.0.1:{proxy.port}"
        client = ClientProc(spec, url, self.workdir, self.run, self.seed, proxy)
        self.clients.append(client)
        client.start()
        return client

    def restart_client(self, client: ClientProc) -> None:
        client.kill()
        client.start()

    # -------------------------------------------------------------- reads
    def server_ids(self) -> dict[str, str]:
        """Every server id seen -> instance name."""
        return {sid: i.name for i in self.instances for sid in i.server_ids}

    def instance_of_pid(self, pid: int) -> Instance | None:
        return next((i for i in self.instances if i.pid == pid), None)

    def all_server_logs(self) -> str:
        return "\n".join(f"== {i.name}\n{i.tail(15)}" for i in self.instances)


# ------------------------------------------------------------------ store reads


async def read_store(database_url: str) -> tuple[list[Any], list[Any]]:
    """(every event in seq order, every workflow record) of the server's store."""
    from sync_server.store import open_store

    store = open_store(database_url)
    await store.open()
    try:
        events: list[Any] = []
        after = 0
        while True:
            page = await store.read_events(after, 5000)
            if not page:
                break
            events.extend(page)
            after = page[-1].seq
        records = await store.list_workflows(limit=1_000_000)
    finally:
        await store.close()
    return events, records


def store_snapshot(database_url: str) -> tuple[list[Any], list[Any]]:
    """``read_store`` from synchronous code."""
    return asyncio.run(read_store(database_url))


def dump_events(events: list[Any], path: Path) -> None:
    """Write the event log as JSON lines (post-mortem of a failed run)."""
    import json

    with path.open("w") as out:
        for e in events:
            data = {k: v for k, v in e.data.items() if k != "workflow"}
            status = (e.data.get("workflow") or {}).get("status")
            row = [e.seq, e.tenant, e.workflow_id, e.type, round(e.at, 3), status, data]
            out.write(json.dumps(row, default=str) + "\n")


async def _count_statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(status -> count, tenant -> last seq, head), read with one short-lived connection."""
    import asyncpg

    from sync_server.store.postgres import parse_postgres_url

    dsn, options, _ = parse_postgres_url(database_url)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'SET search_path TO "{options["schema"]}"')
        rows = await conn.fetch("SELECT status, count(*) AS n FROM workflows GROUP BY status")
        heads = await conn.fetch("SELECT tenant, max(seq) AS seq FROM events GROUP BY tenant")
        head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
    finally:
        await conn.close()
    return {r["status"]: r["n"] for r in rows}, {r["tenant"]: r["seq"] for r in heads}, head


def statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """``(status counts, tenant heads, head)``; raises if the database is unreachable."""
    return asyncio.run(_count_statuses(database_url))


def try_statuses(database_url: str) -> tuple[dict[str, int], dict[str, int], int] | None:
    with contextlib.suppress(Exception):
        return statuses(database_url)
    return None


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh, running private PostgreSQL cluster, destroyed afterwards."""
    pg = PrivatePostgres().init()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
