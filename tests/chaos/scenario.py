"""The chaos scenario (issue 8, part 2): faults on a seeded schedule, then a checker.

Theory of operation
-------------------
* **Deployment** (``tests/cluster.py``): two ``sync-server serve`` instances on a
  *private* PostgreSQL cluster created in a temporary folder, HAProxy in front, the job
  service, and five SDK client processes, each behind its own ``BackgroundProxy`` (so
  one client can be partitioned alone). Two tenants are shared by two clients each,
  one client is alone. The clients submit 200 workflows over most of the window (some
  with per-request job faults: fail first, stall past the step timeout, lose the
  answer, fail always) and cancel a few. The instances run the reconciliation sweep
  against the job service (``--sources``), so repairs happen under faults too.
* **Schedule** (``schedule``): a list of ``Fault`` s drawn from ``random.Random(seed)``
  over ``seconds``: at least one of each kind, then more at random. Each fault begins at
  its time and ends ``duration`` later: SIGKILL a client (restart), SIGKILL or SIGTERM
  an instance (restart), restart PostgreSQL (SIGKILL of the postmaster or
  ``pg_ctl stop -m immediate``, then start), partition a client's link (one direction
  or both; heal), raise the job service's fail rate or stall rate (stalls outlast the
  step timeout: timeouts).
* **Driver**: one loop applies due fault edges and supervises: an instance that should
  run but exited (it refuses to start while the database is down) is spawned again.
  A fault counts only if it really happened: the process was alive and died, the
  postmaster was running and its pid vanished, the partition black-holed bytes or cut
  links, the job service's books show failures/stalls from the window.
* **Heal and check**: every fault ends, every client flushes, every workflow ends; each
  client catches up to its tenant's last event and closes; the checker decides every
  invariant from the event log, the job service's books and each client's SQLite file.
  ``ChaosReport.summary()`` prints faults by kind, workflows by outcome and the checks;
  on failure the error names the seed and the first broken invariant.
* **Heavy variant** (``ChaosOptions(heavy=True)``, issue 11): inputs carry a 0..60 KB
  reference image; every third submit is followed by a state report with a 12 KB
  detail; a ``Firehose`` adds ~16 reports a second with a 15 KB detail to tenant acme;
  client 0 (all its inputs 50..60 KB) is partitioned for half the window, so a backlog
  of megabytes queues up; two ``SlowReader`` s of acme catch up, then read one frame
  every 2 s behind 4 KiB buffers. The instances run with small byte budgets
  (``SYNC_SEND_QUEUE_BYTES`` 256 KiB, ``SYNC_PAGE_BYTES`` 64 KiB). Extra checks: the
  slow readers catch up gapless, and each instance's RSS stays within
  ``HEAVY_RSS_GROWTH`` of its size at the start. Whether the server cuts a slow reader
  (1013 from its send queue, or its keepalive) depends on the kernel's socket buffers —
  a few MB per connection on loopback — so the summary reports those cuts but does not
  require them; ``tests/test_heavy_traffic.py`` and ``tests/test_slow_readers.py``
  prove the 1013 cut deterministically.

Layout: this module holds ``run_chaos``, the entry point; ``tests/chaos/plan.py`` the
fault kinds, ``schedule``, ``ChaosOptions``, ``ChaosReport`` and ``must_have_happened``;
``tests/chaos/driver.py`` the ``Chaos`` driver. Import from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.chaos.driver import Chaos
from tests.chaos.plan import (
    HEAVY_MUST_HAPPEN,
    HEAVY_RSS_GROWTH,
    HEAVY_SERVER_ENV,
    KINDS,
    MUST_HAPPEN,
    SLOW_TENANTS,
    TENANTS,
    ChaosOptions,
    ChaosReport,
    Fault,
    must_have_happened,
    schedule,
)

__all__ = [
    "HEAVY_MUST_HAPPEN",
    "HEAVY_RSS_GROWTH",
    "HEAVY_SERVER_ENV",
    "KINDS",
    "MUST_HAPPEN",
    "SLOW_TENANTS",
    "TENANTS",
    "Chaos",
    "ChaosOptions",
    "ChaosReport",
    "Fault",
    "must_have_happened",
    "run_chaos",
    "schedule",
]


def run_chaos(
    workdir: Path,
    seed: int | None = None,
    seconds: float | None = None,
    *,
    heavy: bool = False,
    workflows: int = 200,
) -> ChaosReport:
    """Run the scenario with the env's seed and length (``TETHER_CHAOS_SEED``/``SECONDS``)."""
    options = ChaosOptions(
        seed=seed if seed is not None else int(os.environ.get("TETHER_CHAOS_SEED", "1")),
        seconds=seconds
        if seconds is not None
        else float(os.environ.get("TETHER_CHAOS_SECONDS", "40")),
        heavy=heavy,
        workflows=workflows,
    )
    return Chaos(workdir, options).run()
