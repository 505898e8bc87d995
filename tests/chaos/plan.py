"""The chaos scenario's plan: fault kinds, the seeded schedule, options and the report.

``tests/chaos/scenario.py`` describes the theory of operation. This module holds what
a run is made of before and after it happens: the fault kinds (``KINDS``, and
``MUST_HAPPEN`` — those whose absence makes a green run meaningless), ``Fault`` and
``schedule`` (the seeded fault list), ``ChaosOptions``, ``ChaosReport`` and
``must_have_happened``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from tests.cluster_check import Verdict

KINDS = (
    "client_kill",
    "instance_kill",
    "instance_term",
    "postgres_restart",
    "partition",
    "job_fail",
    "job_stall",
)
MUST_HAPPEN = ("client_kill", "instance_kill", "postgres_restart", "partition", "job_fail")
"""Kinds whose absence makes a green run meaningless ("sometimes" assertions)."""
TENANTS = ["acme", "acme", "globex", "globex", "initech"]
HEAVY_MUST_HAPPEN = ("large reports applied",)
"""The heavy variant's own "sometimes" assertion: the large reports really flowed."""
SLOW_TENANTS = ("acme", "acme")
"""The slow readers' tenant: the one whose client 0 sends the largest inputs."""
HEAVY_RSS_GROWTH = 96 * 1024 * 1024
"""Most an instance's RSS may grow over the heavy run (bytes)."""
HEAVY_SERVER_ENV = {"SYNC_SEND_QUEUE_BYTES": str(256 * 1024), "SYNC_PAGE_BYTES": str(64 * 1024)}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: begins at ``at`` (s from the start), lasts ``duration``."""

    at: float
    kind: str
    target: int
    duration: float
    detail: str = ""


@dataclass
class ChaosOptions:
    seed: int = 1
    seconds: float = 40.0
    workflows: int = 200
    clients: int = 5
    instances: int = 2
    lease: float = 2.0
    render_timeout: float = 2.5
    reconcile: bool = True
    heavy: bool = False


def schedule(seed: int, seconds: float, clients: int, instances: int) -> list[Fault]:
    """The seeded fault schedule: one of each kind, then about one more per 2.5 s."""
    rng = random.Random(seed)
    window = seconds * 0.8  # the last fifth is fault-free submissions settling

    def draw(kind: str, at: float) -> Fault:
        if kind == "client_kill":
            return Fault(at, kind, rng.randrange(clients), rng.uniform(0.0, 2.0))
        if kind in ("instance_kill", "instance_term"):
            return Fault(at, kind, rng.randrange(instances), rng.uniform(0.5, 4.0))
        if kind == "postgres_restart":
            how = rng.choice(["sigkill", "immediate"])
            return Fault(at, kind, 0, rng.uniform(0.5, 3.0), how)
        if kind == "partition":
            direction = rng.choice(["both", "both", "up", "down"])
            return Fault(at, kind, rng.randrange(clients), rng.uniform(1.5, 6.0), direction)
        rate = round(rng.uniform(0.3, 0.7), 2)
        return Fault(at, kind, 0, rng.uniform(2.0, 6.0), str(rate))

    faults = [draw(kind, rng.uniform(0.1, 0.9) * window) for kind in KINDS]
    # More of the faults that test promises 1 and 4 (client kills, partitions).
    weights = [3, 2, 1, 1, 2, 1, 1]
    t = rng.expovariate(1 / 2.5)
    while t < window:
        faults.append(draw(rng.choices(KINDS, weights)[0], t))
        t += rng.expovariate(1 / 2.5)
    return sorted(faults, key=lambda f: f.at)


@dataclass
class ChaosReport:
    seed: int
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    verdict: Verdict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Instance name -> (RSS at start, peak RSS), bytes (heavy variant)."""

    def summary(self) -> str:
        lines = [f"chaos seed {self.seed}, {self.seconds:.0f} s of faults"]
        lines.append(
            "  faults injected (really happened): "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none")
        )
        if self.skipped:
            lines.append(
                "  scheduled but void (target already down / nothing to cut): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
            )
        if self.verdict is not None:
            lines.append(self.verdict.summary())
        if self.rss:
            lines.append(
                "  instance RSS (start -> peak): "
                + ", ".join(
                    f"{name} {a / 2**20:.0f} -> {b / 2**20:.0f} MiB"
                    for name, (a, b) in sorted(self.rss.items())
                )
            )
        lines.append("  timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)


def must_have_happened(report: ChaosReport, heavy: bool = False) -> list[str]:
    """The kinds in ``MUST_HAPPEN`` (and ``HEAVY_MUST_HAPPEN``) that never really
    happened in this run."""
    kinds = MUST_HAPPEN + (HEAVY_MUST_HAPPEN if heavy else ())
    return [kind for kind in kinds if not report.faults.get(kind)]
