"""The client's durable SQLite file: identity, mutation queue, snapshots, event log.

Theory of operation
-------------------
Tables (schema version ``SCHEMA_VERSION``, stamped with ``PRAGMA application_id``):

* ``meta(key, value)`` — ``client_id`` (created once), ``cursor`` (the highest event
  ``seq`` applied).
* ``mutations(id, name, workflow_id, args, created_at, status, error)`` — the queue
  *and* the optimistic overlay: a pending row is laid over the confirmed state by
  ``client_sdk.views``. ``status`` is ``pending`` until the server answers, then
  ``applied`` or ``rejected``. Ids are contiguous per client; settled rows are
  compacted away except the newest, so ``max(id)`` is always the last id ever used.
  A submit is one append-only INSERT here (sequential key: one WAL page per commit).
* ``workflows(id, name, status, version, snapshot, rejected, rejection, created_at)`` —
  the newest confirmed snapshot (JSON) per workflow, or a placeholder for a submit the
  server confirmed but whose snapshot has not arrived; plus the last rejection.
* ``events(seq, workflow_id, type, version, at)`` — the log of applied events: its
  primary key makes a duplicate impossible and its seq list lets tests check gaps.
* ``flags(name, definition)`` — the tenant's last known flag set (``meta`` keeps its
  ``flags_revision``), replaced whole on every ``Flags`` message; created on open in
  files made before it existed (an additive table: the schema version stays 1).

Invariants (SPEC promises 1, 4, 5):

* a mutation and its optimistic effect (the same row) commit in one transaction,
  before the caller returns (``synchronous=FULL``; ``durability="normal"`` uses
  ``synchronous=NORMAL``: in WAL mode that survives a killed process but may lose the
  last transactions on a power cut or OS crash — no fsync per commit, so much faster
  on slow laptop/phone disks, but weaker than SPEC promise 1);
* a page of events, the snapshots it carries and the new cursor commit together;
* a snapshot replaces the stored one only if its ``version`` is higher, so pages,
  full-snapshot fetches and live events may arrive in any order and still converge.
  An event's snapshot is partial (it carries only the results the event changed) and
  is merged over the stored one before it replaces it (``merge_partial``).

All writes go through one ``CommitQueue`` (group commit). The views' reads
(``get_row``, ``list_rows``) never touch SQLite: they read the in-memory mirror of the
``workflows`` table the writer keeps (``client_sdk.rows``), so the event loop never waits
on the file. The probes (``cursor``, ``event_seqs``, ``mutations``, ``pending_count``)
use a second, query-only connection on the caller's thread (WAL lets it read while the
writer commits); ``load_flags`` is called from a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from client_sdk import compaction
from client_sdk.errors import LocalStoreError
from client_sdk.queue import CommitQueue, convert_sqlite_error
from client_sdk.rows import RowMirror, merge_partial, snapshot_version, to_row
from client_sdk.storefile import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    check_header,
    connect,
    connect_writer,
    init_schema,
    lock_file,
)
from client_sdk.views import WorkflowRow
from protocol import Event, Flags, Mutation
from protocol.flags import FlagDef

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "Durability",
    "LocalStore",
    "Settlement",
    "merge_partial",
]

Durability = Literal["full", "normal"]

_flag_decoder = msgspec.json.Decoder(FlagDef)


_json = msgspec.json.Encoder()
_args_decoder = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class Settlement:
    """The server's final verdict on one mutation: applied, or rejected with a reason."""

    id: int
    applied: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """What the file holds at start."""

    client_id: str
    cursor: int
    last_mutation_id: int
    pending: list[Mutation]


class LocalStore:
    """The client's SQLite file.

    Args:
        path: the file (created if missing).
        durability: ``"full"`` (default; fsync per commit) or ``"normal"``.
        client_id: the id to store in a new file; an existing file must match it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        client_id: str | None = None,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError("durability must be 'full' or 'normal'")
        self.path = os.fspath(path)
        self.durability = durability
        self._wanted_client_id = client_id
        self._queue = CommitQueue(
            lambda: connect_writer(self.path, self.durability),
            path=self.path,
            on_rollback=self._reload,
        )
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._next_id = 1
        self._cursor = 0
        self._pending_submits: set[str] = set()
        self._rows = RowMirror()
        self.opened: Opened | None = None

    @property
    def commit_queue(self) -> CommitQueue:
        """The group-commit writer (its ``commits``/``ops`` counters are probes)."""
        return self._queue

    # ------------------------------------------------------------- lifecycle
    def open(self) -> Opened:
        """Lock, check and (if new) create the file; start the writer.

        Returns:
            The client id, cursor, last mutation id and the pending mutations.

        Raises:
            LocalStoreError: the file is corrupt, foreign, newer, in use, or unusable.
        """
        check_header(self.path)
        self._lock_fd = lock_file(self.path)
        try:
            self._queue.start()
            self.opened = self._queue.run_sync(self._init)
            self._reader = connect(self.path, query_only=True)
        except BaseException:
            self.close()
            raise
        return self.opened

    def close(self) -> None:
        """Finish queued writes and release the file; idempotent."""
        self._queue.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _init(self, conn: sqlite3.Connection) -> Opened:
        try:
            client_id = init_schema(conn, self.path, self._wanted_client_id)
            self._reload(conn)
            pending = [
                Mutation(
                    id=i, name=n, args=_args_decoder.decode(a), created_at=c, traceparent=t or ""
                )
                for i, n, a, c, t in conn.execute(
                    "SELECT id, name, args, created_at, traceparent FROM mutations "
                    "WHERE status = 'pending' ORDER BY id"
                )
            ]
        except sqlite3.DatabaseError as exc:
            raise LocalStoreError(f"{self.path} is not a usable Tether client file: {exc}") from exc
        return Opened(client_id, self._cursor, self._next_id - 1, pending)

    def _reload(self, conn: sqlite3.Connection) -> None:
        """Re-read the counters the ops advance in memory (after a failed commit)."""
        self._next_id = (conn.execute("SELECT max(id) FROM mutations").fetchone()[0] or 0) + 1
        self._cursor = int(
            conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0]
        )
        self._pending_submits = {
            r[0]
            for r in conn.execute(
                "SELECT workflow_id FROM mutations "
                "WHERE status = 'pending' AND name = 'submit_workflow'"
            )
        }
        self._rows.reload(conn)

    # ------------------------------------------------------------------ writes
    def enqueue(
        self,
        name: str,
        workflow_id: str,
        args: dict[str, Any],
        *,
        created_at: float,
        workflow_name: str | None = None,
        args_json: bytes | None = None,
        traceparent: str = "",
    ) -> asyncio.Future[Mutation | None]:
        """Durably queue a mutation with its optimistic effect (one transaction).

        A ``submit_workflow`` whose workflow id is already known locally is not queued
        again (idempotent submit) and resolves to None.

        Returns:
            A future resolved, after the commit, with the queued mutation (its id
            assigned), or None for a repeated submit.

        Raises:
            LocalStoreError: the write failed; nothing was queued.
        """
        encoded = (args_json or _json.encode(args)).decode()

        def op(conn: sqlite3.Connection) -> Mutation | None:
            # One append-only INSERT (sequential key: the WAL gets one page, not a
            # random one per submit); the optimistic effect *is* the pending row, and
            # views lay it over the confirmed state (``client_sdk.views``).
            if name == "submit_workflow":
                if (
                    workflow_id in self._pending_submits
                    or conn.execute(
                        "SELECT 1 FROM workflows WHERE id = ?", (workflow_id,)
                    ).fetchone()
                ):
                    return None
                self._pending_submits.add(workflow_id)
            mutation_id = self._next_id
            conn.execute(
                "INSERT INTO mutations(id, name, workflow_id, args, created_at, traceparent) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (mutation_id, name, workflow_id, encoded, created_at, traceparent),
            )
            self._next_id = mutation_id + 1
            return Mutation(
                id=mutation_id,
                name=name,
                args=args,
                created_at=created_at,
                traceparent=traceparent,
            )

        return self._queue.submit(op)

    async def settle(self, settlements: Sequence[Settlement]) -> set[str]:
        """Record the server's verdicts; a rejection rolls the optimistic change back.

        Returns:
            The ids of the workflows whose view may have changed.
        """

        def op(conn: sqlite3.Connection) -> set[str]:
            changed: set[str] = set()
            for s in settlements:
                row = conn.execute(
                    "UPDATE mutations SET status = ?, error = ? WHERE id = ? "
                    "AND status = 'pending' RETURNING workflow_id, name, args, created_at",
                    ("applied" if s.applied else "rejected", s.error, s.id),
                ).fetchone()
                if row is None:
                    continue
                workflow_id, name, args, created_at = row
                changed.add(workflow_id)
                if name == "submit_workflow":
                    self._pending_submits.discard(workflow_id)
                    # The placeholder stays visible until the server's snapshot lands.
                    workflow_name = str(_args_decoder.decode(args).get("name", ""))
                    conn.execute(
                        "INSERT OR IGNORE INTO workflows(id, name, created_at) VALUES (?, ?, ?)",
                        (workflow_id, workflow_name, created_at),
                    )
                    self._rows.placeholder(workflow_id, workflow_name, created_at)
                if not s.applied:
                    conn.execute(
                        "UPDATE workflows SET rejected = ?, rejection = ? WHERE id = ?",
                        (name, s.error, workflow_id),
                    )
                    self._rows.set_rejection(workflow_id, name, s.error)
                elif name != "submit_workflow":
                    conn.execute(
                        "UPDATE workflows SET rejected = NULL, rejection = NULL "
                        "WHERE id = ? AND rejected IS NOT NULL",
                        (workflow_id,),
                    )
                    self._rows.set_rejection(workflow_id, None, None)
            conn.execute(
                "DELETE FROM mutations WHERE status = 'applied' "
                "AND id < (SELECT max(id) FROM mutations)"
            )
            return changed

        return await self._queue.run(op)

    async def apply_events(self, events: Sequence[Event], cursor: int) -> set[str]:
        """Apply a page of events and advance the cursor, in one transaction.

        Events at or below the stored cursor are skipped (a page is applied once).

        Returns:
            The ids of the workflows whose snapshot may have changed.
        """

        def op(conn: sqlite3.Connection) -> set[str]:
            fresh = [e for e in events if e.seq > self._cursor]
            conn.executemany(
                "INSERT INTO events(seq, workflow_id, type, version, at) VALUES (?, ?, ?, ?, ?)",
                [
                    (e.seq, e.workflow_id, e.type, snapshot_version(e.data.get("workflow")), e.at)
                    for e in fresh
                ],
            )
            changed = self._rows.store_snapshots(conn, (e.data.get("workflow") for e in fresh))
            if cursor > self._cursor:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (cursor,))
                self._cursor = cursor
            return changed

        return await self._queue.run(op)

    async def apply_snapshots(self, snapshots: Iterable[dict[str, Any]]) -> set[str]:
        """Store full snapshots (progressive sync) where newer than what is stored.

        Returns:
            The ids of the workflows whose snapshot may have changed.
        """
        items = list(snapshots)
        return await self._queue.run(lambda conn: self._rows.store_snapshots(conn, items))

    async def reset(self, snapshots: Iterable[dict[str, Any]], *, complete: bool) -> set[str]:
        """Apply a reset's snapshots; with ``complete`` (the server sent all of them),
        confirmed workflows it no longer has (pruned by its retention) leave the file —
        except those a pending mutation still refers to.

        Returns:
            The ids of the workflows whose view may have changed or disappeared.
        """
        items = list(snapshots)

        def op(conn: sqlite3.Connection) -> set[str]:
            changed = self._rows.store_snapshots(conn, items)
            if complete:
                keep = _json.encode([s.get("id") for s in items]).decode()
                gone = conn.execute(
                    "DELETE FROM workflows WHERE snapshot IS NOT NULL "
                    "AND id NOT IN (SELECT value FROM json_each(?)) "
                    "AND id NOT IN (SELECT workflow_id FROM mutations WHERE status = 'pending') "
                    "RETURNING id",
                    (keep,),
                ).fetchall()
                changed.update(r[0] for r in gone)
                self._rows.discard([r[0] for r in gone])
            return changed

        return await self._queue.run(op)

    async def save_flags(self, flags: Flags) -> None:
        """Replace the stored flag set with ``flags`` (one transaction)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM flags")
            conn.executemany(
                "INSERT INTO flags(name, definition) VALUES (?, ?)",
                [(flag.name, _json.encode(flag).decode()) for flag in flags.flags],
            )
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('flags_revision', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (flags.revision,),
            )

        await self._queue.run(op)

    async def compact(self, policy: compaction.CompactionPolicy, now: float) -> tuple[int, int]:
        """Drop old events and old finished workflows, then free the pages.

        Returns:
            (events deleted, finished workflows deleted).

        Raises:
            LocalStoreError: the write failed; nothing was deleted.
        """

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            deleted = compaction.compact(conn, policy, now)
            if deleted[1]:
                self._rows.reload(conn)  # finished workflows left the table
            return deleted

        deleted = await self._queue.run(op)
        if any(deleted):
            try:
                await asyncio.to_thread(compaction.vacuum, self.path)
            except sqlite3.Error as exc:
                raise convert_sqlite_error(exc, self.path) from exc
        return deleted

    def file_bytes(self) -> int:
        """Bytes on disk of the file and its WAL."""
        return compaction.file_bytes(self.path)

    # ------------------------------------------------------------------- reads
    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise LocalStoreError(f"local store {self.path} is closed")
        return self._reader

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._read().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise convert_sqlite_error(exc, self.path) from exc

    def get_row(self, workflow_id: str) -> WorkflowRow | None:
        """One stored workflow (confirmed snapshot, placeholder or rolled-back submit),
        from memory: it never waits on the file (``client_sdk.rows``).

        Raises:
            LocalStoreError: the store is closed.
        """
        self._read()
        raw = self._rows.get(workflow_id)
        return to_row(raw) if raw is not None else None

    def list_rows(self) -> list[WorkflowRow]:
        """Every stored workflow, newest first, from memory (see ``get_row``).

        Raises:
            LocalStoreError: the store is closed.
        """
        self._read()
        return [to_row(r) for r in self._rows.newest_first()]

    def pending_count(self) -> int:
        """How many mutations wait for the server's verdict."""
        return int(self._query("SELECT count(*) FROM mutations WHERE status = 'pending'")[0][0])

    def load_flags(self) -> Flags | None:
        """The last flag set stored, or None if the server never sent one."""
        revision = self._query("SELECT value FROM meta WHERE key = 'flags_revision'")
        if not revision:
            return None
        rows = self._query("SELECT definition FROM flags ORDER BY name")
        return Flags(flags=[_flag_decoder.decode(r[0]) for r in rows], revision=int(revision[0][0]))

    def event_seqs(self) -> list[int]:
        """Every applied event's seq, in order (for gap and duplicate checks)."""
        return [r[0] for r in self._query("SELECT seq FROM events ORDER BY seq")]

    def cursor(self) -> int:
        """The durable cursor."""
        return int(self._query("SELECT value FROM meta WHERE key = 'cursor'")[0][0])

    def mutations(self) -> list[tuple[int, str, str, str, str | None]]:
        """(id, name, workflow_id, status, error) of every kept mutation, in id order."""
        sql = "SELECT id, name, workflow_id, status, error FROM mutations ORDER BY id"
        return [tuple(r) for r in self._query(sql)]
