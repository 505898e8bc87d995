"""What the demo shows while it runs (rich), and its closing report table.

``render_live(state)`` draws one frame from a ``LiveState``: a header (time, phase,
server state), a progress bar per active workflow (from the server's overview), the
counters (per status, retries, breaker state, DLQ depth, clients online/offline/killed)
and the latest injected faults. ``report_table`` draws the final ``DemoReport``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from examples.demo.report import DemoReport

__all__ = ["ClientState", "LiveState", "render_live", "report_table"]

_STATUS_STYLE = {
    "running": "cyan",
    "compensating": "magenta",
    "parked": "yellow",
    "completed": "green",
    "compensated": "magenta",
    "failed": "red",
    "cancelled": "dim",
    "retrying": "yellow",
    "succeeded": "green",
    "waiting": "dim",
}
_BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


@dataclass(slots=True)
class ClientState:
    """What the demo knows about one client process (display only)."""

    index: int
    via_proxy: bool = False
    ready: bool = False
    planned: bool = False
    submitted: int = 0
    pending: int = 0
    connected: bool = False
    offline: bool = False
    killed: bool = False
    restarts: int = 0
    final: dict[str, Any] | None = None


@dataclass(slots=True)
class LiveState:
    """Everything one frame shows."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    server_up: bool = False
    server_restarts: int = 0
    overview: dict[str, Any] = field(default_factory=dict)
    retries_before_restart: float = 0.0
    clients: list[ClientState] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def note(self, text: str) -> str:
        """Record a fault or milestone; returns its log line."""
        self.faults.append((self.elapsed, text))
        return f"[{self.elapsed:5.1f}s] {text}"

    @property
    def retries(self) -> int:
        """Step retries seen by the server processes so far (survives restarts)."""
        metrics = self.overview.get("metrics") or {}
        return int(self.retries_before_restart + metrics.get("step_retries", 0))


def _active_table(overview: dict[str, Any], rows: int) -> Table:
    table = Table(expand=True, box=None, padding=(0, 1), show_edge=False)
    table.add_column("workflow", no_wrap=True, width=8)
    table.add_column("type", no_wrap=True, width=8)
    table.add_column("status", no_wrap=True, width=12)
    table.add_column("progress", ratio=1, min_width=10)
    table.add_column("", justify="right", width=4)
    table.add_column("step", no_wrap=True, min_width=21, max_width=28)
    active = [
        w
        for w in overview.get("workflows", [])
        if w["status"] in ("running", "compensating", "parked")
    ]
    for workflow in active[:rows]:
        step_text = ""
        for name, step in workflow["steps"].items():
            if step["status"] in ("running", "retrying", "compensating", "failed"):
                attempts = f" #{step['attempts']}" if step["attempts"] > 1 else ""
                step_text = f"{name} {step['status']}{attempts}"
                break
        status = workflow["status"]
        step_style = step_text.split(" ")[1] if step_text else ""
        table.add_row(
            workflow["id"][:8],
            workflow["name"].removeprefix("generate_"),
            Text(status, style=_STATUS_STYLE.get(status, "")),
            ProgressBar(
                total=1.0,
                completed=float(workflow["progress"]),
                width=None,
                complete_style=_STATUS_STYLE.get(status, "cyan"),
            ),
            f"{float(workflow['progress']):.0%}",
            Text(step_text, style=_STATUS_STYLE.get(step_style, "")),
        )
    hidden = len(active) - rows
    if hidden > 0:
        table.add_row("", "", "", f"… and {hidden} more", "", "")
    if not active:
        table.add_row("", "", "", Text("no active workflow", style="dim"), "", "")
    return table


def _counters(state: LiveState) -> Table:
    overview = state.overview
    counts = overview.get("counts", {})
    metrics = overview.get("metrics", {})
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    submitted = sum(c.submitted for c in state.clients)
    table.add_row("submitted (clients)", str(submitted))
    table.add_row(
        "on server",
        " ".join(
            f"[{_STATUS_STYLE.get(s, '')}]{s} {counts.get(s, 0)}[/]"
            for s in ("running", "completed", "compensated", "parked", "failed")
            if counts.get(s, 0) or s == "running"
        ),
    )
    table.add_row("retries", str(state.retries))
    breakers = overview.get("breakers", [])
    table.add_row(
        "breakers",
        " ".join(
            f"{b['name']} [{_BREAKER_STYLE.get(b['state'], '')}]{b['state']}[/]" for b in breakers
        )
        or "closed",
    )
    table.add_row("DLQ depth", str(metrics.get("dlq_depth", 0)))
    clients = []
    for c in state.clients:
        if c.killed:
            mark = "[red]killed[/]"
        elif c.offline:
            mark = "[yellow]offline[/]"
        elif c.connected:
            mark = "[green]online[/]"
        else:
            mark = "[dim]connecting[/]"
        clients.append(f"#{c.index} {mark} q{c.pending}")
    table.add_row("clients", "  ".join(clients))
    return table


def render_live(state: LiveState, rows: int = 10) -> RenderableType:
    """One frame of the live view."""
    server = "[green]up[/]" if state.server_up else "[bold red]down[/]"
    header = Text.from_markup(
        f"[bold]Tether demo[/]  {state.elapsed:5.1f}s  phase: [cyan]{state.phase}[/]  "
        f"server: {server}  restarts: {state.server_restarts}"
    )
    faults = Text()
    for n, (at, text) in enumerate(state.faults[-6:]):
        faults.append(("\n" if n else "") + f"{at:5.1f}s ", style="dim")
        faults.append(text)
    return Group(
        header,
        Panel(_active_table(state.overview, rows), title="active workflows", title_align="left"),
        Panel(_counters(state), title="counters", title_align="left"),
        Panel(faults or Text("none yet", style="dim"), title="faults", title_align="left"),
    )


def report_table(report: DemoReport) -> Table:
    """The closing report as a table."""
    verdict = "[bold green]OK[/]" if report.ok else "[bold red]FAILED[/]"
    table = Table(title=f"Tether demo report — {verdict}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("read from", style="dim")
    for measure, value, source in report.rows():
        bad = measure in ("lost", "duplicated effects", "unfinished", "client views diverged")
        style = "bold red" if bad and value != "0" else ""
        table.add_row(measure, Text(value, style=style), source)
    return table
