"""A real HAProxy in front of server instances, from ``deploy/haproxy.cfg``.

The test rewrites only the addresses of the shipped configuration, so what is tested is
what is documented.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def render_config(front_port: int, backend_ports: list[int]) -> str:
    text = CONFIG.read_text()
    text = text.replace("bind 127.0.0.1:8700", f"bind 127.0.0.1:{front_port}")
    text = re.sub(r"^\s*server \w+ 127\.0\.0\.1:\d+ check\n", "", text, flags=re.M)
    servers = "".join(
        f"    server s{i} 127.0.0.1:{port} check\n" for i, port in enumerate(backend_ports)
    )
    return text.rstrip("\n") + "\n" + servers


@contextlib.contextmanager
def haproxy(front_port: int, backend_ports: list[int], workdir: Path) -> Iterator[int]:
    """Run HAProxy in the foreground on ``front_port``; yields the port."""
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError(
            "haproxy is not installed (.ci/run installs it: apt-get install haproxy)"
        )
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(render_config(front_port, backend_ports))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"bad haproxy config: {check.stdout}{check.stderr}")
    # Its notices (servers marked up or down, and why) go to a file for post-mortems.
    log = (workdir / "haproxy.log").open("ab")
    proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", front_port), timeout=0.5),
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"haproxy did not start: {(workdir / 'haproxy.log').read_text()}"
                )
            time.sleep(0.05)
        yield front_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
