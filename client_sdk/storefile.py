"""Opening the client's SQLite file: the header check, the lock, connections, schema.

See ``client_sdk.localstore`` for the tables and their invariants.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import uuid

from client_sdk.errors import LocalStoreError
from client_sdk.queue import convert_sqlite_error

__all__ = [
    "ADD_TRACEPARENT",
    "APPLICATION_ID",
    "FLAGS_TABLE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "WAL_SIZE_LIMIT",
    "check_header",
    "connect",
    "connect_writer",
    "init_schema",
    "lock_file",
]

APPLICATION_ID = 0x54455448  # "TETH"
SCHEMA_VERSION = 1
WAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint."""

SCHEMA = """
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

ADD_TRACEPARENT = "ALTER TABLE mutations ADD COLUMN traceparent TEXT NOT NULL DEFAULT ''"
FLAGS_TABLE = (
    "CREATE TABLE IF NOT EXISTS flags(name TEXT PRIMARY KEY, definition TEXT NOT NULL) "
    "WITHOUT ROWID"
)


def check_header(path: str) -> None:
    """Refuse a file that is not SQLite (before SQLite would overwrite it).

    Raises:
        LocalStoreError: it cannot be read, or is not a SQLite database.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalStoreError(f"cannot read local store {path}: {exc}") from exc
    if header and header != b"SQLite format 3\x00":
        raise LocalStoreError(
            f"{path} is not a SQLite database (foreign or corrupt file); "
            "point SyncClient(path=...) at a Tether client file or a new path"
        )


def lock_file(path: str) -> int:
    """Take the file's exclusive lock (``path.lock``); returns its descriptor.

    Raises:
        LocalStoreError: another SyncClient holds it.
    """
    # One SyncClient per file: two writers would hand out the same mutation ids.
    # flock is released by the kernel when the process dies, even on SIGKILL.
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise LocalStoreError(
            f"local store {path} is in use by another SyncClient", retryable=True
        ) from exc
    return fd


def connect(path: str, *, query_only: bool = False) -> sqlite3.Connection:
    """A connection to the file (any thread may use it).

    Raises:
        LocalStoreError: SQLite refused.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if query_only:
            conn.execute("PRAGMA query_only = 1")
        return conn
    except sqlite3.Error as exc:
        raise convert_sqlite_error(exc, path) from exc


def connect_writer(path: str, durability: str) -> sqlite3.Connection:
    """The writer's connection: WAL, ``synchronous`` by durability, auto-vacuum.

    Raises:
        LocalStoreError: the file is not a usable SQLite database.
    """
    conn = connect(path)
    try:
        # Takes effect on a new file only (before its first table): lets compaction
        # give free pages back (``client_sdk.compaction``).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {durability.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    except sqlite3.Error as exc:
        conn.close()
        raise LocalStoreError(f"{path} is not a usable SQLite database: {exc}") from exc
    return conn


def init_schema(conn: sqlite3.Connection, path: str, wanted_client_id: str | None) -> str:
    """Create the tables in a new file, check an existing one, add what later versions
    added; returns the file's client id (``wanted_client_id`` or a new one if new).

    Raises:
        LocalStoreError: a foreign, newer or corrupt file, or another client's.
        sqlite3.DatabaseError: SQLite refused (the caller converts it).
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    if app_id == 0 and not tables:
        # executescript() would COMMIT the writer's transaction; run one by one.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    elif app_id != APPLICATION_ID:
        raise LocalStoreError(
            f"{path} was not created by Tether (application_id {app_id}, "
            f"tables {sorted(tables)[:5]}); refusing to write to a foreign database"
        )
    elif version > SCHEMA_VERSION:
        raise LocalStoreError(
            f"{path} has schema version {version}, newer than this SDK's "
            f"{SCHEMA_VERSION}; upgrade the SDK"
        )
    conn.execute(FLAGS_TABLE)
    check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    if check != "ok":
        raise LocalStoreError(f"{path} is corrupt: {check}")
    row = conn.execute("SELECT value FROM meta WHERE key = 'client_id'").fetchone()
    if row is None:
        client_id = wanted_client_id or str(uuid.uuid4())
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [("client_id", client_id), ("cursor", 0), ("created_at", time.time())],
        )
    else:
        client_id = row[0]
        if wanted_client_id not in (None, client_id):
            raise LocalStoreError(f"{path} belongs to client {client_id}, not {wanted_client_id}")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(mutations)")}
    if "traceparent" not in columns:
        # Added after schema 1 without a version bump: an older SDK reading this
        # file ignores the column, and this one adds it to an older file.
        conn.execute(ADD_TRACEPARENT)
    return client_id
