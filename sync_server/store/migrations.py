"""Versioned schema migrations for both backends, applied by ``Store.open()``.

Theory of operation
-------------------
Each backend has an ordered list of ``(version, statements)``. ``schema_migrations``
records the versions applied. ``open()`` applies the missing ones in one transaction,
so a crash mid-migration leaves the previous version intact:

* SQLite: under ``BEGIN IMMEDIATE`` (the database write lock), so two processes opening
  one file at once apply each migration once.
* PostgreSQL: under ``pg_advisory_xact_lock`` keyed by the schema name, taken *before*
  ``CREATE SCHEMA IF NOT EXISTS`` (which itself races), so several server instances
  starting together serialise here and the later ones find nothing to do.

A database whose ``schema_migrations`` holds a version newer than this code knows is
refused (``StorageError``): an older server must not write a newer schema.

Evolve by appending a migration (``schema_sqlite``, ``schema_postgres``); never edit an
applied one. Missing migrations are applied in version order. A SQLite migration step
may be a function of the connection (SQLite cannot change a primary key in place:
``schema_sqlite._rebuild`` copies the table).

Version 2 (issue 11, SPEC promise 6) namespaces client-chosen ids by tenant: workflows
are keyed ``(id, tenant)``, clients ``(client_id, tenant)`` with the ``subject`` the
client id belongs to, mutation results ``(client_id, tenant, mutation_id)``, and an
event's ``wf_seq`` is unique per ``(workflow_id, tenant)``. The id comes first in each
key so that a lookup by id alone (a global admin's) uses the same index.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from protocol import StorageError
from sync_server.store.schema_postgres import POSTGRES_MIGRATIONS
from sync_server.store.schema_sqlite import SQLITE_MIGRATIONS, Migration, SqliteMigration

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "POSTGRES_MIGRATIONS",
    "SQLITE_MIGRATIONS",
    "Migration",
    "SqliteMigration",
    "migrate_postgres",
    "migrate_sqlite",
]


_SQLITE_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"""
_PG_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY, applied_at double precision NOT NULL)"""


def _check_known(applied: set[int], known: Sequence[tuple[int, object]], where: str) -> None:
    newest = max(version for version, _ in known)
    if applied and max(applied) > newest:
        raise StorageError(
            f"{where} has schema version {max(applied)}, newer than this server "
            f"supports ({newest}); upgrade the server"
        )


def migrate_sqlite(conn: sqlite3.Connection, where: str = "database") -> list[int]:
    """Apply the missing SQLite migrations in one ``BEGIN IMMEDIATE`` transaction.

    Args:
        conn: a connection in autocommit mode (``isolation_level=None``).
        where: the database's name for error messages.

    Returns:
        The versions applied now (empty when the schema was current).

    Raises:
        StorageError: the schema is newer than this code; sqlite3 errors propagate.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SQLITE_VERSIONS)
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        _check_known(applied, SQLITE_MIGRATIONS, where)
        done: list[int] = []
        for version, steps in sorted(SQLITE_MIGRATIONS, key=lambda m: m[0]):
            if version in applied:
                continue
            for step in steps:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
            done.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return done


def _lock_key(schema: str) -> int:
    digest = hashlib.blake2b(f"tether-migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def migrate_postgres(
    conn: asyncpg.Connection | PoolConnectionProxy, schema: str
) -> list[int]:
    """Create ``schema`` if needed and apply the missing PostgreSQL migrations.

    Args:
        conn: a connection; the work runs in one transaction on it.
        schema: a validated identifier (the caller checks it).

    Returns:
        The versions applied now (empty when the schema was current).

    Raises:
        StorageError: the schema is newer than this code; asyncpg errors propagate.
    """
    async with conn.transaction():
        # Serialise concurrent starters before anything else, CREATE SCHEMA included.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        await conn.execute(_PG_VERSIONS)
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        applied = {row[0] for row in rows}
        _check_known(applied, POSTGRES_MIGRATIONS, f"schema {schema!r}")
        done: list[int] = []
        for version, statements in sorted(POSTGRES_MIGRATIONS, key=lambda m: m[0]):
            if version in applied:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                version,
                time.time(),
            )
            done.append(version)
    return done
