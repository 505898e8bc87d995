"""Reads and writes of the ``flags`` table (migration 4) on both backends.

A flag change runs inside one ``Transaction``: the row is read and locked, written, and
its audit event is appended to the log, so they commit together or not at all. The
functions here take that transaction and pick the backend's SQL by its type; the
``Store``/``Transaction`` ABCs stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from protocol.flags import FlagDef
from sync_server.store.base import Transaction
from sync_server.store.pg_transaction import PostgresTransaction
from sync_server.store.sqlite_transaction import SqliteTransaction

__all__ = ["FlagRecord", "count_scope", "lock_scope", "read_flag", "read_scope", "write_flag"]

_decoder = msgspec.json.Decoder(FlagDef)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class FlagRecord:
    """One stored flag: its scope (a tenant, or ``*`` for every tenant) and definition."""

    scope: str
    flag: FlagDef
    updated_at: float
    updated_by: str


def _record(scope: str, definition: str, updated_at: float, updated_by: str) -> FlagRecord:
    return FlagRecord(scope, _decoder.decode(definition), float(updated_at), updated_by)


async def lock_scope(tx: Transaction, scope: str) -> None:
    """Serialise changes of one scope until commit, creations included (a row lock
    cannot cover a row that does not exist yet, and the per-scope count must hold).
    PostgreSQL: a transaction-level advisory lock; SQLite's unit of work already holds
    the database write lock."""
    if isinstance(tx, PostgresTransaction):
        await tx._execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"tether-flags:{scope}"
        )


async def read_scope(tx: Transaction, scope: str) -> list[FlagRecord]:
    """Every flag of one scope, by name."""
    sql = (
        "SELECT scope, definition, updated_at, updated_by FROM flags WHERE scope = {} ORDER BY name"
    )
    if isinstance(tx, PostgresTransaction):
        rows = await tx._fetch(sql.format("$1"), scope)
        return [_record(*row) for row in rows]
    assert isinstance(tx, SqliteTransaction)
    return [_record(*row) for row in tx._all(sql.format("?"), (scope,))]


async def read_flag(tx: Transaction, scope: str, name: str) -> FlagRecord | None:
    """One flag, its row locked until commit (PostgreSQL; SQLite's unit of work holds
    the database write lock already)."""
    sql = (
        "SELECT scope, definition, updated_at, updated_by FROM flags WHERE scope = {} AND name = {}"
    )
    if isinstance(tx, PostgresTransaction):
        row = await tx._fetchrow(sql.format("$1", "$2") + " FOR UPDATE", scope, name)
        return _record(*row) if row is not None else None
    assert isinstance(tx, SqliteTransaction)
    found = tx._one(sql.format("?", "?"), (scope, name))
    return _record(*found) if found is not None else None


async def count_scope(tx: Transaction, scope: str) -> int:
    """How many flags one scope holds."""
    if isinstance(tx, PostgresTransaction):
        return int(await tx._fetchval("SELECT count(*) FROM flags WHERE scope = $1", scope))
    assert isinstance(tx, SqliteTransaction)
    return int(tx._one("SELECT count(*) FROM flags WHERE scope = ?", (scope,))[0])


async def write_flag(tx: Transaction, record: FlagRecord) -> None:
    """Insert or replace one flag."""
    flag = record.flag
    params = (
        record.scope,
        flag.name,
        _encoder.encode(flag).decode(),
        flag.version,
        record.updated_at,
        record.updated_by,
    )
    sql = (
        "INSERT INTO flags (scope, name, definition, version, updated_at, updated_by) "
        "VALUES ({}) ON CONFLICT (scope, name) DO UPDATE SET definition = excluded.definition, "
        "version = excluded.version, updated_at = excluded.updated_at, "
        "updated_by = excluded.updated_by"
    )
    if isinstance(tx, PostgresTransaction):
        await tx._execute(sql.format("$1, $2, $3, $4, $5, $6"), *params)
        return
    assert isinstance(tx, SqliteTransaction)
    tx._execute(sql.format("?, ?, ?, ?, ?, ?"), params)
