"""The saga runner's heartbeat: keeping the leases it holds.

Theory of operation
-------------------
Every ``heartbeat_interval`` (default ``lease/3``), or sooner when a held lease is
about to lapse, the heartbeat renews every lease this instance holds in one call
(``Store.renew_leases``), bounded by the interval. A renewed lease is good until its
new expiry less ``_lease_margin`` (``Held.valid_until``, on the monotonic clock). A
lease the store did not renew was taken over or revoked, and a lease that could not be
confirmed (the database is down or slow) and may have expired is given up too: its
attempts are cancelled locally, because another instance may now run them and the
same attempt must never run twice at once. Fencing refuses any write that still comes
late. Renewal errors are logged, never fatal; ``CancelledError`` is never caught.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protocol import StorageError
from sync_server.saga.state import RunnerState
from sync_server.store.base import WorkflowKey

__all__ = ["Heartbeat"]

log = logging.getLogger("tether.saga")


class Heartbeat(RunnerState):
    """The runner's lease renewal (a part of ``SagaRunner``)."""

    async def _heartbeat(self) -> None:
        """Renew held leases every ``heartbeat_interval``.

        A lease is only as good as its last confirmation: when renewal fails or hangs
        (the database is down, the network is cut), attempts whose lease may have
        expired are stopped — another instance may take the workflow over once the
        lease runs out, and the same attempt must never run twice at once (issue 4:
        leases; LESSONS: leases need fencing). Fencing then refuses any late write.
        """
        while True:
            now = time.monotonic()
            soonest = min((h.valid_until for h in self._held.values()), default=float("inf"))
            await asyncio.sleep(max(0.0, min(self.heartbeat_interval, soonest - now)))
            leases = self.held
            if not leases:
                continue
            started = time.monotonic()
            renewed: set[WorkflowKey] | None = None
            try:
                renewed = await asyncio.wait_for(
                    self.store.renew_leases(
                        self.instance_id, leases, self.clock() + self.lease_seconds
                    ),
                    timeout=self.heartbeat_interval,
                )
            except (StorageError, TimeoutError) as exc:
                log.warning("lease renewal failed: %s", exc or "timed out")
            except Exception:
                log.exception("lease renewal failed unexpectedly")
            now = time.monotonic()
            for wid, fence in leases.items():
                held = self._held.get(wid)
                if held is None or held.fence != fence:
                    continue
                if renewed is not None and wid in renewed:
                    held.valid_until = started + self.lease_seconds - self._lease_margin
                    continue
                if renewed is None and now < held.valid_until:
                    continue  # not confirmed, but not expired either: try again soon
                self.stats["lost_leases"] += 1
                log.warning("lease of workflow %s lost or unconfirmed; stopping its attempts", wid)
                self._held.pop(wid, None)
                held.cancel()
