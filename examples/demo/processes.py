"""The demo's child processes: the server (killed and restarted on one port) and the SDK
clients (each reporting JSON lines), plus the options both are started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from examples.demo.live import ClientState

__all__ = ["ClientProcess", "DemoOptions", "ServerProcess", "free_port"]


@dataclass(slots=True)
class DemoOptions:
    """What ``sync-server demo`` was asked for.

    Attributes:
        workflows: workflows submitted in total (split over the clients).
        clients: SDK client processes.
        seconds: the submission window, during which faults are injected.
        seed: seeds the plan (inputs, doomed renders) and the job service's faults.
        faults: inject faults (``--no-faults`` turns them off).
        quiet: plain log lines instead of the live view (tests, CI).
        drain_timeout: seconds to wait, after the window, for every workflow to end.
        keep: keep the temporary folder (it is kept anyway when the run fails).
    """

    workflows: int = 48
    clients: int = 3
    seconds: float = 20.0
    seed: int = 7
    faults: bool = True
    quiet: bool = False
    drain_timeout: float = 60.0
    keep: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """The demo server as a child process (start, SIGKILL, start again: same port)."""

    def __init__(self, folder: Path, job_url: str, secret: str) -> None:
        self.port = free_port()
        self.database = f"sqlite:///{folder / 'sync.db'}"
        self.job_url = job_url
        self.env = {**os.environ, "SYNC_AUTH_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        self.log_path = folder / "server.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        """Spawn and wait until ``/readyz`` answers.

        Raises:
            RuntimeError: it exited or did not become ready in time.
        """
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.demo.server",
            "--port",
            str(self.port),
            "--database",
            self.database,
            "--job-service",
            self.job_url,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.http_url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the demo server did not start; see {self.log_path}")

    async def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._log is not None:
            self._log.close()

    async def stop(self) -> None:
        """SIGTERM (a graceful drain), SIGKILL after a few seconds."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 8)
            except TimeoutError:
                await self.kill()
        if self._log is not None:
            self._log.close()


class ClientProcess:
    """One SDK client child process and what its JSON lines told us (display only)."""

    def __init__(
        self,
        index: int,
        url: str,
        folder: Path,
        token: str,
        count: int,
        options: DemoOptions,
        run_id: str,
        state: ClientState,
    ) -> None:
        self.index = index
        self.url = url
        self.path = folder / f"client-{index}.db"
        self.log_path = folder / f"client-{index}.log"
        self.count = count
        self.options = options
        self.run_id = run_id
        self.state = state
        self.env = {**os.environ, "TETHER_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._final = asyncio.Event()

    async def start(self) -> None:
        """Spawn (again, after a kill: the same file, the same plan)."""
        self._ready.clear()
        self.state.ready = self.state.planned = False
        log = self.log_path.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "examples.demo.client",
            "--url",
            self.url,
            "--path",
            str(self.path),
            "--index",
            str(self.index),
            "--count",
            str(self.count),
            "--seconds",
            str(self.options.seconds * 0.8),
            "--seed",
            str(self.options.seed),
            "--run",
            self.run_id,
            "--drain",
            str(self.options.drain_timeout / 2),
        ]
        if self.options.faults:
            cmd.append("--faults")
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        log.close()
        self.state.killed = False
        self._reader = asyncio.create_task(self._read(self.proc))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the child's ``ready`` line.

        Raises:
            RuntimeError: it did not start in time.
        """
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"client {self.index} did not start; see {self.log_path}") from None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            state = self.state
            if "ready" in message:
                state.ready = True
                self._ready.set()
            elif "submitted" in message:
                state.submitted += 1
            elif "status" in message:
                state.pending = int(message["status"]["pending"])
                state.connected = bool(message["status"]["connected"])
            elif "planned" in message:
                state.planned = True
            elif "final" in message:
                state.final = message["final"]
                self._final.set()

    async def kill(self) -> None:
        """SIGKILL, mid-whatever it was doing."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
        self.state.killed = True
        self.state.connected = False
        self.state.restarts += 1

    async def finish(self, timeout: float) -> None:
        """Ask it to flush and converge, then wait for it to exit."""
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.write(b"finish\n")
            await proc.stdin.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._final.wait(), timeout)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader

    async def abort(self) -> None:
        """Kill it if it still runs (cleanup)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
