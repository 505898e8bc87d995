"""The server's storage: one narrow interface (``Store``/``Transaction``), SQLite and
PostgreSQL backends.

Layers, top down: the domain operations (``transaction``, ``limit_store``, ``store_ops``,
``pruning``) are written once on four query primitives (``dialect.Sql``) over shared SQL
(``statements``, ``limit_sql``) that the backend's ``Dialect`` renders; a backend
(``postgres``/``pg_transaction``, ``sqlite``/``sqlite_transaction``) supplies the
primitives, its units of work (``run``: locking, event positions, COMMIT), ``read_events``
and ``head``, and the batches it moves its own way. Row types: ``records``.

``open_store(url)`` picks the backend by URL scheme and returns it *unopened*; open it
with ``await store.open()`` or ``async with open_store(url) as store:``.
"""

from __future__ import annotations

from typing import Any

from protocol import UsageError
from sync_server.store.base import (
    BreakerRecord,
    DlqEntry,
    NewEvent,
    OutboxItem,
    Store,
    StoredEvent,
    Transaction,
    WorkflowKey,
    WorkflowRecord,
)

__all__ = [
    "BreakerRecord",
    "DlqEntry",
    "NewEvent",
    "OutboxItem",
    "Store",
    "StoredEvent",
    "Transaction",
    "WorkflowKey",
    "WorkflowRecord",
    "open_store",
]


def open_store(url: str, **options: Any) -> Store:
    """Build the store for ``url`` (not yet opened).

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, or
            ``postgresql://user@host:port/db?schema=NAME`` (also ``postgres://``).
        options: backend keyword options (SQLite: ``busy_timeout``; PostgreSQL:
            ``min_size``, ``max_size``, ``connect_timeout``).

    Returns:
        A ``Store``; call ``await store.open()`` (or use ``async with``) before use.

    Raises:
        UsageError: the URL's scheme is not one of the above, or the URL is malformed.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from sync_server.store.sqlite import SqliteStore

        return SqliteStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        from sync_server.store.postgres import PostgresStore

        return PostgresStore(url, **options)
    raise UsageError(
        f"unsupported database URL {_redact(url)!r}: expected sqlite:///path/to/file.db "
        "or postgresql://user@host:port/dbname"
    )


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url
