"""``python -m bench [FIGURE…] [--quick] [--json PATH]``: run, show progress, report.

The markdown table goes to stdout; progress goes to stderr (rich). The JSON report holds
every row, every raw limit measured, the machine facts and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.core import FIGURE_ORDER, FIGURES, Context, Row, Stat, run_figure
from bench.machine import machine_facts
from bench.procs import raise_fd_limit

__all__ = ["main", "markdown_table"]

DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"


def _load_figures() -> None:
    """Import every figure module (they register themselves)."""
    import bench.aging
    import bench.bounded
    import bench.client
    import bench.connections
    import bench.fanout
    import bench.flags
    import bench.ingest
    import bench.limits
    import bench.recovery
    import bench.resilience
    import bench.saga
    import bench.tracing  # noqa: F401


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 0.1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def _stat(stat: Stat | None) -> str:
    if stat is None:
        return "—"
    if len(stat.values) == 1:
        return _fmt(stat.median, stat.unit)
    return f"{_fmt(stat.median, stat.unit)} [{_fmt(stat.min)}..{_fmt(stat.max)}]"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a markdown table."""
    lines = [
        "| figure | measure | Tether median [min..max] | raw limit (same run) | peer | ratio "
        "| target | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row.status != "ok":
            result = row.status
        elif row.passed is None:
            result = "info"
        else:
            result = "pass" if row.passed else "**miss**"
        raw = f"{_stat(row.raw)} ({row.raw_label})" if row.raw else row.raw_label or "—"
        peer = f"{_stat(row.peer)} ({row.peer_label})" if row.peer else row.peer_label or "—"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
        cells = [
            row.figure,
            row.measure,
            _stat(row.tether),
            raw,
            peer,
            ratio,
            row.target,
            result,
        ]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def _select(names: Sequence[str]) -> list[str]:
    if not names:
        return list(FIGURE_ORDER)
    by_lower = {name.lower(): name for name in FIGURE_ORDER}
    chosen: list[str] = []
    for name in names:
        found = by_lower.get(name.lower())
        if found is None:
            raise SystemExit(f"unknown figure {name!r}; known: {', '.join(FIGURE_ORDER)}")
        if found not in chosen:
            chosen.append(found)
    return [name for name in FIGURE_ORDER if name in chosen]


async def _run(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    repeats = args.repeats or (1 if args.quick else 3)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[figure]}[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} figures"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    )
    task = progress.add_task("starting", total=len(names), figure="")

    def say(text: str) -> None:
        progress.update(task, description=text[:70])

    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, repeats=repeats, pg_dsn=args.pg, workdir=workdir, progress=say)
    started = time.time()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    try:
        ctx.facts = await machine_facts(args.pg)
        with progress:
            for name in names:
                progress.update(task, figure=name, description="running")
                figure_rows, seconds = await run_figure(ctx, name)
                timings[name] = round(seconds, 2)
                rows.extend(figure_rows)
                for row in figure_rows:
                    if row.status.startswith("error"):
                        console.print(f"[red]{name}: {row.status}[/red]")
                progress.advance(task)
    finally:
        await ctx.aclose()
    return {
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "repeats": repeats,
        "started": started,
        "seconds": round(time.time() - started, 1),
        "machine": ctx.facts,
        "figures": names,
        "figure_seconds": timings,
        "rows": [row.to_json() for row in rows],
        "raw_limits": _plain(ctx.raw_results),
        "notes": ctx.notes,
        "_rows": rows,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Stat):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Tether's headline figures next to their raw limits (shared/BENCH.md).",
    )
    parser.add_argument("figures", nargs="*", help=f"some of {', '.join(FIGURE_ORDER)}")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="JSON report path")
    parser.add_argument("--repeats", type=int, default=0, help="repeats (default 3; quick 1)")
    parser.add_argument(
        "--pg",
        default=os.environ.get("TETHER_PG_DSN", "postgresql://127.0.0.1:5432/test"),
        help="PostgreSQL server (a private database is created and dropped)",
    )
    parser.add_argument("--workdir", default="", help="keep files and server logs here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample every child server and worker with py-spy; print their hot functions",
    )
    args = parser.parse_args(argv)
    _load_figures()
    names = _select(args.figures)
    missing = [name for name in names if name not in FIGURES]
    if missing:
        raise SystemExit(f"figures without an implementation: {missing}")
    raise_fd_limit()
    profiles: Path | None = None
    if args.profile:
        from bench import profiling

        base = Path(args.workdir) if args.workdir else Path(args.json).parent
        profiles = base / "profiles"
        for old in profiles.glob("*.txt"):
            old.unlink()
        profiling.enable(profiles)
    from bench.worker import install_uvloop

    install_uvloop()
    report = asyncio.run(_run(args, names))
    rows: list[Row] = report.pop("_rows")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    facts = report["machine"]
    print(
        f"Tether bench — {facts.get('date')} — "
        f"{facts.get('cpu_count')} x {facts.get('cpu_model')}, "
        f"{facts.get('memory_gib')} GiB, Python {facts.get('python')}, SQLite "
        f"{facts.get('sqlite')}, PostgreSQL {facts.get('postgresql')}"
        f"{' — QUICK run (small sizes, 1 repeat)' if args.quick else ''}"
    )
    print()
    print(markdown_table(rows))
    print()
    print(f"{report['seconds']} s; JSON: {path}")
    if profiles is not None:
        from bench.profiling import summarise

        print("\n## Profiles (py-spy, non-idle samples)\n")
        for recording in sorted(profiles.glob("*.txt")):
            print("```\n" + summarise(recording) + "\n```")
    return 0
