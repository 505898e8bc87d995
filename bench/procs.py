"""Child processes of a run: servers under test, raw servers, the job service, workers.

Every server under test runs in its own process (``python -m bench.serve …``) so that it
has a core of its own, its memory can be read from outside (psutil RSS), and it can be
SIGKILLed. Workers (``python -m bench.worker …``) run one measurement in a fresh
interpreter and print its JSON result as the last line of stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.profiling import Sampler

__all__ = [
    "SECRET",
    "Child",
    "child",
    "free_port",
    "raise_fd_limit",
    "rss_bytes",
    "run_worker",
    "wait_port",
]

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
"""The HS256 secret every bench server verifies tokens with."""


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Raises:
        TimeoutError: nothing listens within ``timeout`` seconds.
        RuntimeError: ``proc`` exited first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"child exited with {proc.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (bytes)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    return int(psutil.Process(pid).memory_info().rss)


@dataclass
class Child:
    """A running child server."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:port``."""
        return f"ws://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """The child's resident set size (bytes)."""
        return rss_bytes(self.proc.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the child has used so far."""
        import psutil  # type: ignore[import-untyped,unused-ignore]

        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def kill(self) -> None:
        """SIGKILL the child (a crash); idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the child's stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def child(
    kind: str,
    args: Sequence[str],
    *,
    logdir: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 30.0,
) -> AsyncIterator[Child]:
    """Run ``python -m bench.serve KIND --port P ARGS…`` for the duration of the block.

    The child is terminated (SIGTERM, then SIGKILL after 10 s) on the way out.

    Raises:
        RuntimeError: the child exited before it listened (its log tail is included).
    """
    port = port or free_port()
    log_path = logdir / f"{kind}-{port}.log"
    cmd = [sys.executable, "-m", "bench.serve", kind, "--port", str(port), *args]
    full_env = {**os.environ, "SYNC_AUTH_SECRET": SECRET, **(env or {})}
    with log_path.open("wb") as log:
        # Popen, not asyncio: the child must be signalled and polled synchronously too.
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    running = Child(proc, port, log_path)
    sampler = Sampler(proc.pid, f"{kind}-{port}")
    try:
        try:
            await wait_port(port, ready_timeout, proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{kind} server did not start: {exc}\n{running.log_tail()}") from exc
        yield running
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)


async def run_worker(
    target: str,
    params: dict[str, Any],
    *,
    timeout: float = 300.0,
    logdir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``bench.worker`` (``module:function`` with JSON params) in a fresh interpreter.

    Returns:
        The JSON value the function returned.

    Raises:
        RuntimeError: the worker failed or printed no result (its output is included).
        TimeoutError: it ran longer than ``timeout`` seconds (it is killed).
    """
    cmd = [sys.executable, "-m", "bench.worker", target, json.dumps(params)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SYNC_AUTH_SECRET": SECRET, **(env or {})},
    )
    sampler = Sampler(proc.pid, "worker-" + target.rsplit(":", 1)[-1])
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"worker {target} ran longer than {timeout} s") from None
    finally:
        await asyncio.to_thread(sampler.stop)
    text = out.decode(errors="replace")
    if logdir is not None:
        (logdir / f"worker-{target.replace(':', '-')}-{proc.pid}.log").write_bytes(out + err)
    lines = [line for line in text.splitlines() if line.startswith("@result ")]
    if proc.returncode != 0 or not lines:
        tail = (text + err.decode(errors="replace"))[-3000:]
        raise RuntimeError(f"worker {target} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("@result ") :])
