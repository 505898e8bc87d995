"""The ``workflows`` table's rows: an in-memory mirror, decoding, partial-snapshot merge.

Theory of operation
-------------------
``SyncClient.get_workflow`` and ``list_workflows`` are synchronous (SPEC) and run on the
application's event loop, so they must not touch SQLite: a read there waits on the
file (a checkpoint, a lock held by another connection, a slow disk) with the loop
blocked. They read ``RowMirror`` instead: the raw rows of the ``workflows`` table
(``id, name, snapshot JSON, rejected, rejection, created_at, version``) in a dict.

* Only the store's writer thread changes the mirror, inside the op that changes the
  table, with the same rule the SQL applies (a snapshot replaces the stored one only
  if its version is higher), so the mirror equals the table as of the last op run.
* A failed COMMIT rolls the table back, and a failed op in a batch is rolled back to
  its SAVEPOINT; the store's ``on_rollback`` then reloads the mirror from the file
  (``reload``), as it reloads its other counters.
* Readers (any thread) take a copy under a lock; a snapshot is decoded on read, as
  before.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

import msgspec

from client_sdk.views import WorkflowRow
from protocol import WorkflowSnapshot

__all__ = ["RawRow", "RowMirror", "merge_partial", "snapshot_version", "to_row"]

RawRow = tuple[str, str, str | None, str | None, str | None, float, int]
"""``(id, name, snapshot JSON, rejected, rejection, created_at, version)``."""

SELECT_ROWS = "SELECT id, name, snapshot, rejected, rejection, created_at, version FROM workflows"

_snapshot_decoder = msgspec.json.Decoder(WorkflowSnapshot)
_json = msgspec.json.Encoder()

UPSERT_SNAPSHOT = """
INSERT INTO workflows(id, name, status, version, snapshot, created_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET name = excluded.name, status = excluded.status,
    version = excluded.version, snapshot = excluded.snapshot
WHERE excluded.version > workflows.version
"""


class RowMirror:
    """The ``workflows`` table in memory (written by the writer thread only)."""

    def __init__(self) -> None:
        self._rows: dict[str, RawRow] = {}
        self._lock = threading.Lock()

    def reload(self, conn: sqlite3.Connection) -> None:
        """Replace the mirror with the table as ``conn`` sees it."""
        rows = {r[0]: tuple(r) for r in conn.execute(SELECT_ROWS)}
        with self._lock:
            self._rows = rows

    def get(self, workflow_id: str) -> RawRow | None:
        """One raw row."""
        with self._lock:
            return self._rows.get(workflow_id)

    def newest_first(self) -> list[RawRow]:
        """Every raw row, by ``created_at`` descending then id (the old SQL order)."""
        with self._lock:
            rows = list(self._rows.values())
        rows.sort(key=lambda r: (-r[5], r[0]))
        return rows

    def store_snapshots(self, conn: sqlite3.Connection, snapshots: Iterable[Any]) -> set[str]:
        """Store snapshots (dicts) where newer than the stored ones, merging a partial
        one over its predecessor (``merge_partial``), in the table and here; returns
        the ids stored (on the writer thread, inside its transaction).
        """
        newest: dict[str, dict[str, Any]] = {}
        for snap in snapshots:
            if not isinstance(snap, dict) or not isinstance(snap.get("id"), str):
                continue
            seen = newest.get(snap["id"])
            if snap.get("partial"):
                # An event's snapshot carries only the results it changed: lay it over
                # the previous one (WorkflowSnapshot.partial), in log order.
                if seen is None:
                    seen = _stored_snapshot(conn, snap["id"])
                if seen is not None and snapshot_version(snap) <= snapshot_version(seen):
                    continue
                snap = merge_partial(seen, snap)
            if seen is None or snapshot_version(snap) > snapshot_version(seen):
                newest[snap["id"]] = snap
        rows = [
            (
                i,
                str(s.get("name", "")),
                str(s.get("status", "")),
                snapshot_version(s),
                _json.encode(s).decode(),
                float(s.get("updated_at") or 0.0),
            )
            for i, s in newest.items()
        ]
        conn.executemany(UPSERT_SNAPSHOT, rows)
        for i, name, _, version, snapshot, at in rows:
            self.upsert(i, name, version, snapshot, at)
        return set(newest)

    def upsert(self, workflow_id: str, name: str, version: int, snapshot: str, at: float) -> None:
        """A snapshot stored where newer (``_UPSERT_SNAPSHOT``'s rule)."""
        with self._lock:
            old = self._rows.get(workflow_id)
            if old is None:
                self._rows[workflow_id] = (workflow_id, name, snapshot, None, None, at, version)
            elif version > old[6]:
                self._rows[workflow_id] = (
                    workflow_id,
                    name,
                    snapshot,
                    old[3],
                    old[4],
                    old[5],
                    version,
                )

    def placeholder(self, workflow_id: str, name: str, created_at: float) -> None:
        """A confirmed submit whose snapshot has not arrived (``INSERT OR IGNORE``)."""
        with self._lock:
            self._rows.setdefault(workflow_id, (workflow_id, name, None, None, None, created_at, 0))

    def set_rejection(self, workflow_id: str, rejected: str | None, reason: str | None) -> None:
        """The last rejected mutation of a workflow (None, None: cleared)."""
        with self._lock:
            old = self._rows.get(workflow_id)
            if old is not None:
                self._rows[workflow_id] = (*old[:3], rejected, reason, *old[5:])

    def discard(self, workflow_ids: list[str]) -> None:
        """Rows deleted from the table."""
        with self._lock:
            for workflow_id in workflow_ids:
                self._rows.pop(workflow_id, None)


def _stored_snapshot(conn: sqlite3.Connection, workflow_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT snapshot FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    stored = msgspec.json.decode(row[0])
    return stored if isinstance(stored, dict) else None


def to_row(r: RawRow) -> WorkflowRow:
    """Decode a raw row into the view's ``WorkflowRow``."""
    snapshot = _snapshot_decoder.decode(r[2]) if r[2] is not None else None
    return WorkflowRow(
        id=r[0], name=r[1], snapshot=snapshot, rejected=r[3], rejection=r[4], created_at=r[5]
    )


def merge_partial(previous: dict[str, Any] | None, partial: dict[str, Any]) -> dict[str, Any]:
    """A whole snapshot: ``partial``, with every result it leaves out ("as before", a
    None) taken from ``previous``, and the output taken from the step ``result_of``
    names.
    """
    merged = dict(partial)
    merged["partial"] = False
    result_of = merged.pop("result_of", "")
    merged["result_of"] = ""
    if previous is not None:
        if merged.get("result") is None:
            merged["result"] = previous.get("result")
        before = previous.get("steps")
        steps = merged.get("steps")
        if isinstance(before, dict) and isinstance(steps, dict):
            merged["steps"] = {
                name: (
                    {**step, "result": before[name].get("result")}
                    if isinstance(step, dict)
                    and step.get("result") is None
                    and isinstance(before.get(name), dict)
                    else step
                )
                for name, step in steps.items()
            }
    steps = merged.get("steps")
    if result_of and isinstance(steps, dict) and isinstance(steps.get(result_of), dict):
        merged["result"] = steps[result_of].get("result")  # the output is that step's result
    return merged


def snapshot_version(snapshot: Any) -> int:
    """A snapshot dict's ``version`` (0 if it has none)."""
    if isinstance(snapshot, dict):
        version = snapshot.get("version")
        if isinstance(version, int):
            return version
    return 0
