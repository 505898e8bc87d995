"""``--profile``: sample every child server and worker with py-spy, then summarise.

With ``python -m bench B2 --profile`` each child process started by the run gets a
``py-spy record --format raw`` sidecar (collapsed stacks, ``--nonblocking`` so the
target is never paused); when the run ends the stacks are summarised per process: the
functions of Tether's packages with the most samples, by self time and inclusive time.
py-spy is in the ``bench`` extra; without it ``--profile`` only says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Sampler", "profile_dir", "summarise"]

_ENV = "TETHER_BENCH_PROFILE"
OURS = ("sync_server/", "protocol/", "client_sdk/", "bench/")


def profile_dir() -> Path | None:
    """Where profiles go when ``--profile`` is on, else None."""
    value = os.environ.get(_ENV)
    return Path(value) if value else None


def enable(directory: Path) -> None:
    """Turn profiling on for this run (children inherit it through the environment)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[_ENV] = str(directory)


class Sampler:
    """A py-spy sidecar recording one process until it exits or ``stop`` is called."""

    def __init__(self, pid: int, label: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        directory = profile_dir()
        beside = Path(sys.executable).parent / "py-spy"
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if directory is None or exe is None:
            return
        self.path = directory / f"{label}-{pid}.txt"
        self.proc = subprocess.Popen(
            [exe, "record", "--format", "raw", "--rate", "250", "--nonblocking",
             "--pid", str(pid), "--output", str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        """Let py-spy write its file (SIGINT), then reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


def _function(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in OURS:
        index = path.find(marker)
        if index >= 0:
            return f"{path[index:]}:{name}"
    return f"{Path(path).name}:{name}" if path else name


def summarise(path: Path, top: int = 15) -> str:
    """The hot functions of one recording: self and inclusive sample shares."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples"]
    lines.append("  self:")
    for name, count in self_counts.most_common(top):
        lines.append(f"    {100 * count / total:5.1f}%  {name}")
    lines.append("  inclusive (Tether code):")
    ours = [(n, c) for n, c in incl_counts.most_common() if n.startswith(OURS)]
    for name, count in ours[:top]:
        lines.append(f"    {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)
