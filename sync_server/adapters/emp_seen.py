"""What the emp-job-queue adapter learns of jobs that ended, and remembers, bounded.

The queue's status answer carries neither result nor error: the end of a job is read
from its events (``ended_view``: success comes as two ``complete_job`` shapes, failure
as a failed ``complete_job`` and ``job_failed``) or its attestation record
(``attested_view``) — pure functions. A completion event is sent once, to one
connection: what the adapter saw is kept (``SeenJobs``) so a later lookup (another
attempt, the reconciliation sweep) can still answer. Bounded in count and in bytes;
the oldest entries go first (they can still be found in the attestation records).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import datetime
from typing import Any

from sync_server.adapters.keyed import JobView

__all__ = ["SeenJobs", "attested_view", "ended_view", "unix_time"]


class SeenJobs:
    """Results and errors seen in events, bounded in count and bytes (oldest dropped)."""

    def __init__(self, max_items: int = 4096, max_bytes: int = 16 << 20) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[JobView, int]] = OrderedDict()

    def put(self, job_id: str, view: JobView) -> None:
        """Remember ``view`` as the end of ``job_id``, dropping the oldest entries past
        ``max_items`` or ``max_bytes`` (the size of a view is its JSON result's)."""
        size = len(json.dumps(view.result, default=str)) + len(view.error or "") + 64
        old = self._items.pop(job_id, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[job_id] = (view, size)
        self.bytes += size
        while self._items and (len(self._items) > self.max_items or self.bytes > self.max_bytes):
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def get(self, job_id: str) -> JobView | None:
        """The end seen for ``job_id``, or None if none was (or it was dropped)."""
        item = self._items.get(job_id)
        return item[0] if item else None


def unix_time(value: Any) -> float | None:
    """An ISO 8601 time (or unix seconds / milliseconds) as unix seconds."""
    if isinstance(value, int | float):
        return float(value) / (1000.0 if value > 1e11 else 1.0)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def ended_view(message: dict[str, Any]) -> JobView | None:
    """The end a ``complete_job`` or ``job_failed`` event reports (None: not an end)."""
    kind = message.get("type")
    if kind == "job_failed":
        return JobView("failed", error=str(message.get("error") or "failed"))
    result = message.get("result")
    if kind != "complete_job" or not isinstance(result, dict):
        return None
    if result.get("status") == "success" or result.get("success") is True:
        data = result.get("data")
        return JobView("completed", result={} if data is None else data)
    if result.get("status") == "failed" or result.get("success") is False:
        return JobView("failed", error=str(result.get("error") or "failed"))
    return None


def attested_view(record: dict[str, Any]) -> JobView:
    """The end an attestation record reports (``result.data`` or ``result``)."""
    result = record.get("result")
    if isinstance(result, dict) and "data" in result:
        result = result["data"]
    if record.get("status") == "completed":
        # None means "not known" to the adapter, never "no data".
        return JobView("completed", result={} if result is None else result)
    return JobView("failed", error=str(record.get("error") or "failed"))
