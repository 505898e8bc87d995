"""The child processes of a test ``Cluster``: server instances, the job service, clients.

``tests/cluster.py`` describes the theory of operation. This module holds the pieces
that each own one child process — ``Instance`` (a restartable ``sync-server serve``),
``JobService`` and ``ClientProc`` (an SDK client, described by a ``ClientSpec``) — and
the helpers they share: ``wait_until`` (poll with a deadline, never a fixed sleep) and
the child environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.cluster_child import SideFile
from tests.conftest import scaled
from tests.faultproxy import BackgroundProxy
from tests.sync_helpers import token

ROOT = Path(__file__).resolve().parent.parent


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
