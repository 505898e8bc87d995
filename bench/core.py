"""The bench framework: rows, statistics, the run context and the figure registry.

Theory of operation
-------------------
A *figure* (B1, B1g, B2 … B8, see ``shared/BENCH.md``) is an async function that takes
the run's ``Context`` and returns ``Row``s — one per reported measure (B3 gives a p50 and
a p99 row per client count, B2 one row per backend, …). Each row holds Tether's values
over the repeats, the raw limit measured in the same run (and the peer's, where there is
one), the ratio and the verdict against the BENCH.md target.

Raw limits are shared by several figures (the sqlite3 single-row commit serves B1, B1g
and B5l), so ``Context.raw`` measures each one once per run, on first use, and caches
it. A figure whose component is missing returns ``Row.unavailable``; one that fails is
caught by the runner and reported as an ``error:`` row — a run always produces a row for
every figure it was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FIGURES",
    "FIGURE_ORDER",
    "Context",
    "FigureFn",
    "Row",
    "Stat",
    "figure",
    "percentile",
    "run_figure",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear interpolation.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class Stat:
    """One measure over the repeats: every value, and their median, min and max."""

    values: list[float]
    unit: str = ""

    @classmethod
    def of(cls, values: Sequence[float], unit: str = "") -> Stat:
        """A Stat of ``values`` (at least one).

        Raises:
            ValueError: no values.
        """
        if not values:
            raise ValueError("a Stat needs at least one value")
        return cls([float(v) for v in values], unit)

    @property
    def median(self) -> float:
        """The median of the repeats."""
        return float(statistics.median(self.values))

    @property
    def min(self) -> float:
        """The lowest repeat."""
        return min(self.values)

    @property
    def max(self) -> float:
        """The highest repeat."""
        return max(self.values)

    def to_json(self) -> dict[str, Any]:
        """Plain data for the JSON report."""
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": self.values,
            "unit": self.unit,
        }


@dataclass(slots=True)
class Row:
    """One line of the results table.

    Attributes:
        figure: the BENCH.md figure (``"B3"``).
        measure: what this row measures (``"100 clients, last receiver p99"``).
        tether: Tether's values over the repeats (None when not available).
        raw: the raw limit of the same building block, same run.
        raw_label: what the raw limit is.
        peer: the peer's values (DBOS), same run.
        peer_label: what the peer is.
        ratio: Tether / raw (or / peer where the target is relative to the peer).
        target: the BENCH.md target for this measure, as text.
        passed: the verdict; None when there is no verdict (informational, quick run).
        status: ``"ok"``, ``"not available: <reason>"`` or ``"error: <reason>"``.
        details: anything else worth keeping (percentiles, sizes, notes).
    """

    figure: str
    measure: str
    tether: Stat | None = None
    raw: Stat | None = None
    raw_label: str = ""
    peer: Stat | None = None
    peer_label: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    status: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def unavailable(cls, figure: str, reason: str, target: str = "") -> Row:
        """A row for a figure that cannot be measured on this tree (yet)."""
        return cls(figure, "-", target=target, status=f"not available: {reason}")

    @classmethod
    def error(cls, figure: str, reason: str) -> Row:
        """A row for a figure whose measurement failed."""
        return cls(figure, "-", status=f"error: {reason}")

    def to_json(self) -> dict[str, Any]:
        """Plain data for the JSON report."""
        return {
            "figure": self.figure,
            "measure": self.measure,
            "tether": self.tether.to_json() if self.tether else None,
            "raw": self.raw.to_json() if self.raw else None,
            "raw_label": self.raw_label,
            "peer": self.peer.to_json() if self.peer else None,
            "peer_label": self.peer_label,
            "ratio": self.ratio,
            "target": self.target,
            "passed": self.passed,
            "status": self.status,
            "details": self.details,
        }


FigureFn = Callable[["Context"], Awaitable[list[Row]]]
RawFn = Callable[["Context"], Awaitable[Any]]

FIGURE_ORDER = [
    "B1",
    "B1g",
    "B2",
    "B3",
    "B3x",
    "B4",
    "B5",
    "B5l",
    "B5q",
    "B6",
    "B7",
    "B8",
    "B9",
    "B10",
    "B11",
    "B12",
]
"""Every figure of BENCH.md, in report order."""

FIGURES: dict[str, FigureFn] = {}
"""Figure name -> its measuring function (filled by ``figure``)."""


def figure(name: str) -> Callable[[FigureFn], FigureFn]:
    """Register a figure function under its BENCH.md name."""

    def register(fn: FigureFn) -> FigureFn:
        FIGURES[name] = fn
        return fn

    return register


ProgressFn = Callable[[str], None]


class Context:
    """What every figure of one run shares.

    Args:
        quick: a seconds-long smoke run (small sizes, one repeat).
        repeats: repeats of every figure (>= 3 in a full run).
        pg_dsn: the PostgreSQL server to use (a private database is made per run).
        workdir: where SQLite files and logs go (a temporary folder by default).
        progress: called with a short text whenever a figure moves on.
    """

    def __init__(
        self,
        *,
        quick: bool,
        repeats: int,
        pg_dsn: str,
        workdir: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.quick = quick
        self.repeats = repeats
        self.pg_dsn = pg_dsn
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tether-bench-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self._progress = progress or (lambda text: None)
        self._raw: dict[str, Any] = {}
        self._raw_locks: dict[str, asyncio.Lock] = {}
        self.notes: list[str] = []
        self.facts: dict[str, Any] = {}
        self._counter = 0
        from bench.pg import PrivateDatabase

        self.pg = PrivateDatabase(pg_dsn)
        self._cluster: Any = None
        self._cluster_dsn: str | None = None

    def say(self, text: str) -> None:
        """Show progress text."""
        self._progress(text)

    def size(self, full: int, quick: int) -> int:
        """A problem size: ``full`` in a full run, ``quick`` in a quick one."""
        return quick if self.quick else full

    def path(self, stem: str) -> Path:
        """A fresh file path under the work folder."""
        self._counter += 1
        return self.workdir / f"{stem}-{self._counter}"

    async def raw(self, name: str, fn: RawFn) -> Any:
        """The raw limit ``name``, measured once per run by ``fn(ctx)`` and cached."""
        lock = self._raw_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._raw:
                self.say(f"raw limit: {name}")
                self._raw[name] = await fn(self)
            return self._raw[name]

    @property
    def raw_results(self) -> dict[str, Any]:
        """Every raw limit measured so far."""
        return dict(self._raw)

    async def pg_url(self, schema: str) -> str:
        """A Tether PostgreSQL URL: a fresh schema in this run's private database."""
        self._counter += 1
        return await self.pg.url(f"{schema}_{self._counter}")

    async def cluster(self) -> str:
        """The DSN of this run's private PostgreSQL cluster (started on first use).

        Raises:
            RuntimeError: the cluster cannot be started here.
        """
        if self._cluster_dsn is None:
            from bench.pg import PrivateCluster
            from bench.procs import free_port

            self.say("starting a private PostgreSQL cluster")
            cluster = PrivateCluster(free_port())
            self._cluster = cluster
            self._cluster_dsn = await asyncio.to_thread(cluster.start)
        return self._cluster_dsn

    async def aclose(self) -> None:
        """Drop the private database, stop the private cluster, remove the work folder."""
        with contextlib.suppress(Exception):
            await self.pg.drop()
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.stop)
            self._cluster = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()


async def run_figure(ctx: Context, name: str) -> tuple[list[Row], float]:
    """Run one figure, turning any failure into an ``error:`` row.

    Returns:
        The rows and the seconds it took.
    """
    fn = FIGURES.get(name)
    start = time.perf_counter()
    if fn is None:
        return [Row.error(name, "no such figure")], 0.0
    try:
        rows = await fn(ctx)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        rows = [Row.error(name, detail[:300])]
        rows[0].details["traceback"] = traceback.format_exc()[-4000:]
    if not rows:
        rows = [Row.error(name, "the figure produced no rows")]
    return rows, time.perf_counter() - start


def ratio(tether: Stat | None, other: Stat | None) -> float | None:
    """Median over median, or None if either is missing or the divisor is zero."""
    if tether is None or other is None or other.median == 0:
        return None
    return tether.median / other.median


def verdict(ctx: Context, ok: bool) -> bool:
    """The pass/miss verdict (a quick run's sizes are small: its verdicts are a hint)."""
    return bool(ok)
