"""Compaction of the client's SQLite file, so it stays bounded under traffic (SPEC 8).

Theory of operation
-------------------
The file holds three things that grow: the log of applied events, the snapshots of
finished workflows, and the free pages deletes leave behind. ``CompactionPolicy`` says
how much of each to keep:

* a view keeps only its newest snapshot already (``LocalStore`` upserts by version);
  the event log keeps the newest ``event_log_limit`` applied events — every event at or
  below the cursor has been applied, so older ones are only history;
* a finished workflow whose snapshot is older than ``finished_retention`` leaves the
  file, unless a pending mutation still refers to it;
* new files use ``auto_vacuum = INCREMENTAL``: after a compaction, the free pages go
  back to the file system (``PRAGMA incremental_vacuum``) on a short-lived connection —
  the pragma must run outside the group-commit transaction — and the writer caps the
  WAL with ``journal_size_limit``. Files created before auto-vacuum existed keep their
  size until one ``VACUUM``.

``SyncClient`` compacts at start and after every ``every`` applied events.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass

from protocol import TERMINAL_WORKFLOW_STATUSES

__all__ = ["CompactionPolicy", "compact", "file_bytes", "vacuum"]

_TERMINAL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL_WORKFLOW_STATUSES))


@dataclass(frozen=True, slots=True)
class CompactionPolicy:
    """What the client's file keeps.

    Attributes:
        event_log_limit: applied events kept in the log, newest first (None keeps all).
        finished_retention: seconds a finished workflow stays after its last update
            (0 keeps them forever).
        every: applied events between two compactions.
    """

    event_log_limit: int | None = 100_000
    finished_retention: float = 30 * 86_400.0
    every: int = 10_000

    def __post_init__(self) -> None:
        if self.event_log_limit is not None and self.event_log_limit < 0:
            raise ValueError("event_log_limit must be >= 0 or None")
        if not self.finished_retention >= 0:
            raise ValueError("finished_retention must be >= 0 seconds")
        if self.every < 1:
            raise ValueError("every must be >= 1")


def compact(conn: sqlite3.Connection, policy: CompactionPolicy, now: float) -> tuple[int, int]:
    """Delete what ``policy`` does not keep (inside the caller's transaction).

    Returns:
        (events deleted, finished workflows deleted).
    """
    events = 0
    if policy.event_log_limit is not None:
        events = conn.execute(
            "DELETE FROM events WHERE seq <= "
            "(SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (policy.event_log_limit,),
        ).rowcount
    finished = 0
    if policy.finished_retention > 0:
        finished = conn.execute(
            f"DELETE FROM workflows WHERE status IN ({_TERMINAL}) AND snapshot IS NOT NULL "
            "AND json_extract(snapshot, '$.updated_at') < ? "
            "AND id NOT IN (SELECT workflow_id FROM mutations WHERE status = 'pending')",
            (now - policy.finished_retention,),
        ).rowcount
    return events, finished


def vacuum(path: str, busy_timeout: float = 5.0) -> int:
    """Give the file's free pages back (incremental auto-vacuum); returns pages freed.

    Runs on its own connection: ``executescript`` is the one way Python's sqlite3 runs
    the pragma to completion, and it commits whatever transaction is open.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    try:
        before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if before and int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
            conn.executescript("PRAGMA incremental_vacuum;")
        return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    finally:
        conn.close()


def file_bytes(path: str) -> int:
    """Bytes on disk of the database file and its WAL."""
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(name)
    return total
