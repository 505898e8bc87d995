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

All writes go through one ``CommitQueue`` (group commit); reads use a second,
query-only connection on the caller's thread (WAL lets it read while the writer commits).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from client_sdk import compaction
from client_sdk.errors import LocalStoreError
from client_sdk.queue import CommitQueue, convert_sqlite_error
from client_sdk.views import WorkflowRow
from protocol import Event, Flags, Mutation, WorkflowSnapshot
from protocol.flags import FlagDef

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "Durability", "LocalStore", "Settlement"]

APPLICATION_ID = 0x54455448  # "TETH"
SCHEMA_VERSION = 1
Durability = Literal["full", "normal"]
WAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint."""

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID;
CREATE TABLE mutations(
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, workflow_id TEXT NOT NULL,
    args TEXT NOT NULL, created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', error TEXT);
CREATE TABLE workflows(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT, version INTEGER NOT NULL DEFAULT 0,
    snapshot TEXT, rejected TEXT, rejection TEXT, created_at REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE events(
    seq INTEGER PRIMARY KEY, workflow_id TEXT NOT NULL, type TEXT NOT NULL,
    version INTEGER NOT NULL, at REAL NOT NULL);
"""

_ADD_TRACEPARENT = "ALTER TABLE mutations ADD COLUMN traceparent TEXT NOT NULL DEFAULT ''"
_FLAGS_TABLE = (
    "CREATE TABLE IF NOT EXISTS flags(name TEXT PRIMARY KEY, definition TEXT NOT NULL) "
    "WITHOUT ROWID"
)
_flag_decoder = msgspec.json.Decoder(FlagDef)

_UPSERT_SNAPSHOT = """
INSERT INTO workflows(id, name, status, version, snapshot, created_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET name = excluded.name, status = excluded.status,
    version = excluded.version, snapshot = excluded.snapshot
WHERE excluded.version > workflows.version
"""

_SELECT_ROW = "SELECT id, name, snapshot, rejected, rejection, created_at FROM workflows"
_snapshot_decoder = msgspec.json.Decoder(WorkflowSnapshot)
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
        self._queue = CommitQueue(self._connect_writer, path=self.path, on_rollback=self._reload)
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._next_id = 1
        self._cursor = 0
        self._pending_submits: set[str] = set()
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
        self._check_header()
        self._lock()
        try:
            self._queue.start()
            self.opened = self._queue.run_sync(self._init)
            self._reader = self._connect(query_only=True)
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

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                header = f.read(16)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LocalStoreError(f"cannot read local store {self.path}: {exc}") from exc
        if header and header != b"SQLite format 3\x00":
            raise LocalStoreError(
                f"{self.path} is not a SQLite database (foreign or corrupt file); "
                "point SyncClient(path=...) at a Tether client file or a new path"
            )

    def _lock(self) -> None:
        # One SyncClient per file: two writers would hand out the same mutation ids.
        # flock is released by the kernel when the process dies, even on SIGKILL.
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise LocalStoreError(
                f"local store {self.path} is in use by another SyncClient", retryable=True
            ) from exc
        self._lock_fd = fd

    def _connect(self, *, query_only: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            if query_only:
                conn.execute("PRAGMA query_only = 1")
            return conn
        except sqlite3.Error as exc:
            raise convert_sqlite_error(exc, self.path) from exc

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            # Takes effect on a new file only (before its first table): lets compaction
            # give free pages back (``client_sdk.compaction``).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.durability.upper()}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except sqlite3.Error as exc:
            conn.close()
            raise LocalStoreError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        return conn

    def _init(self, conn: sqlite3.Connection) -> Opened:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
            if app_id == 0 and not tables:
                # executescript() would COMMIT the writer's transaction; run one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise LocalStoreError(
                    f"{self.path} was not created by Tether (application_id {app_id}, "
                    f"tables {sorted(tables)[:5]}); refusing to write to a foreign database"
                )
            elif version > SCHEMA_VERSION:
                raise LocalStoreError(
                    f"{self.path} has schema version {version}, newer than this SDK's "
                    f"{SCHEMA_VERSION}; upgrade the SDK"
                )
            conn.execute(_FLAGS_TABLE)
            check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise LocalStoreError(f"{self.path} is corrupt: {check}")
            row = conn.execute("SELECT value FROM meta WHERE key = 'client_id'").fetchone()
            if row is None:
                client_id = self._wanted_client_id or str(uuid.uuid4())
                conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("client_id", client_id), ("cursor", 0), ("created_at", time.time())],
                )
            else:
                client_id = row[0]
                if self._wanted_client_id not in (None, client_id):
                    raise LocalStoreError(
                        f"{self.path} belongs to client {client_id}, not {self._wanted_client_id}"
                    )
            columns = {r[1] for r in conn.execute("PRAGMA table_info(mutations)")}
            if "traceparent" not in columns:
                # Added after schema 1 without a version bump: an older SDK reading this
                # file ignores the column, and this one adds it to an older file.
                conn.execute(_ADD_TRACEPARENT)
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
                    conn.execute(
                        "INSERT OR IGNORE INTO workflows(id, name, created_at) VALUES (?, ?, ?)",
                        (workflow_id, str(_args_decoder.decode(args).get("name", "")), created_at),
                    )
                if not s.applied:
                    conn.execute(
                        "UPDATE workflows SET rejected = ?, rejection = ? WHERE id = ?",
                        (name, s.error, workflow_id),
                    )
                elif name != "submit_workflow":
                    conn.execute(
                        "UPDATE workflows SET rejected = NULL, rejection = NULL "
                        "WHERE id = ? AND rejected IS NOT NULL",
                        (workflow_id,),
                    )
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
                    (e.seq, e.workflow_id, e.type, _version(e.data.get("workflow")), e.at)
                    for e in fresh
                ],
            )
            changed = self._upsert(conn, (e.data.get("workflow") for e in fresh))
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
        return await self._queue.run(lambda conn: self._upsert(conn, items))

    async def reset(self, snapshots: Iterable[dict[str, Any]], *, complete: bool) -> set[str]:
        """Apply a reset's snapshots; with ``complete`` (the server sent all of them),
        confirmed workflows it no longer has (pruned by its retention) leave the file —
        except those a pending mutation still refers to.

        Returns:
            The ids of the workflows whose view may have changed or disappeared.
        """
        items = list(snapshots)

        def op(conn: sqlite3.Connection) -> set[str]:
            changed = self._upsert(conn, items)
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
            return changed

        return await self._queue.run(op)

    def _upsert(self, conn: sqlite3.Connection, snapshots: Iterable[Any]) -> set[str]:
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
                if seen is not None and _version(snap) <= _version(seen):
                    continue
                snap = merge_partial(seen, snap)
            if seen is None or _version(snap) > _version(seen):
                newest[snap["id"]] = snap
        conn.executemany(
            _UPSERT_SNAPSHOT,
            [
                (
                    i,
                    str(s.get("name", "")),
                    str(s.get("status", "")),
                    _version(s),
                    _json.encode(s).decode(),
                    float(s.get("updated_at") or 0.0),
                )
                for i, s in newest.items()
            ],
        )
        return set(newest)

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
        deleted = await self._queue.run(lambda conn: compaction.compact(conn, policy, now))
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
        """One stored workflow (confirmed snapshot, placeholder or rolled-back submit)."""
        rows = self._query(_SELECT_ROW + " WHERE id = ?", (workflow_id,))
        return _row(rows[0]) if rows else None

    def list_rows(self) -> list[WorkflowRow]:
        """Every stored workflow, newest first."""
        return [_row(r) for r in self._query(_SELECT_ROW + " ORDER BY created_at DESC, id")]

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


def _stored_snapshot(conn: sqlite3.Connection, workflow_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT snapshot FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    stored = msgspec.json.decode(row[0])
    return stored if isinstance(stored, dict) else None


def _version(snapshot: Any) -> int:
    if isinstance(snapshot, dict):
        version = snapshot.get("version")
        if isinstance(version, int):
            return version
    return 0


def _row(r: tuple[Any, ...]) -> WorkflowRow:
    snapshot = _snapshot_decoder.decode(r[2]) if r[2] is not None else None
    return WorkflowRow(
        id=r[0], name=r[1], snapshot=snapshot, rejected=r[3], rejection=r[4], created_at=r[5]
    )
