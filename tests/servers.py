"""Real servers for tests: uvicorn in-process on a loopback port, or a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import uvicorn

SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_config(app: Any, sock_port: int = 0, **overrides: Any) -> uvicorn.Config:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": sock_port,
        "ws": "websockets-sansio",
        "ws_max_size": 4 * 1024 * 1024,
        "ws_per_message_deflate": False,
        "log_level": "warning",
        "lifespan": "on",
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


class RunningServer:
    """A uvicorn server started in this event loop."""

    def __init__(self, app: Any, port: int | None = None, sndbuf: int | None = None) -> None:
        self.app = app
        self.sndbuf = sndbuf
        self.port = port or 0
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.sock: socket.socket | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.sndbuf:
            # Accepted sockets inherit it: lets a test fill a connection's buffers quickly.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        # asyncio sets TCP_NODELAY only on sockets it creates; accepted sockets inherit
        # it from this one. Without it every HTTP answer waits ~40 ms (Nagle + delayed ACK).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app))
        self.server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not self.server.started:
            if self.task.done():
                self.task.result()
            if loop.time() > deadline:
                raise TimeoutError("uvicorn did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 20)
        if self.sock is not None:
            self.sock.close()


@contextlib.asynccontextmanager
async def running(
    app: Any, port: int | None = None, sndbuf: int | None = None
) -> AsyncIterator[RunningServer]:
    """Serve ``app`` on 127.0.0.1 for the duration of the block."""
    server = RunningServer(app, port, sndbuf)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``url`` answers 200 (a child server is ready)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready: {last}")


@contextlib.contextmanager
def server_process(
    database_url: str,
    *,
    port: int | None = None,
    workflows: str | None = None,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    stderr: Any = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``sync-server serve`` as a child process (kill it with SIGKILL to test crashes)."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "sync_server.cli",
        "serve",
        "--port",
        str(port),
        "--database",
        database_url,
        "--log-level",
        "warning",
    ]
    # serve runs only the definitions it is given; "demo" is the example pipeline.
    if workflows or "--workflows" not in (args or []):
        cmd += ["--workflows", workflows or "demo"]
    cmd += args or []
    full_env = {**os.environ, "SYNC_AUTH_SECRET": SECRET, **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env, stderr=stderr)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
