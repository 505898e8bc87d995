"""What the two SQL dialects spell differently, and the query primitives of a backend.

Theory of operation
-------------------
Shared statements are written once, in PostgreSQL's spelling with numbered ``$n``
parameters. ``Dialect.sql`` turns such a statement into the backend's own text:

* PostgreSQL runs it as written (the text that reaches the server — and so its prepared
  statement and plan — is exactly the text in the source);
* SQLite numbers its parameters the same way (``?n``); a list parameter
  (``= ANY($n)``) becomes a JSON array read with ``json_each``; a row lock
  (``FOR UPDATE [OF w] [SKIP LOCKED]``) is dropped, since a SQLite writer holds the
  whole database's write lock (``statements.sqlite_text``).

The few fragments that are built rather than rewritten (a list of (name, version)
pairs, a lock clause, how a list parameter travels) are methods and attributes of the
dialect. ``Sql`` is the narrow surface a backend implements — fetch all, fetch one,
execute, execute many — on which every domain operation is written once
(``transaction``, ``limit_store``, ``base``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from sync_server.store import rows, statements
from sync_server.store.records import RoundTrips

__all__ = ["LOCK_ROWS", "POSTGRES", "SQLITE", "Dialect", "Sql"]

LOCK_ROWS = " FOR UPDATE"
"""Appended to a read that locks its rows until commit (PostgreSQL only)."""


class Dialect:
    """How one backend spells what the shared SQL leaves open.

    Args:
        name: ``postgresql`` or ``sqlite``.
        own: the statements this backend writes its own way (a different plan, not
            just a different spelling), by name (``sync_server.store.statements``).
        one_round_trip: statements cost a network round trip, so several are combined
            into one where SQL allows (PostgreSQL); SQLite runs in-process and keeps
            them apart (simpler plans, nothing to save).
    """

    def __init__(self, name: str, *, one_round_trip: bool, own: dict[str, str]) -> None:
        self.name = name
        self.own = own
        self.one_round_trip = one_round_trip
        self.lock = LOCK_ROWS if one_round_trip else ""
        self._rendered: dict[str, str] = {}

    def sql(self, text: str) -> str:
        """The backend's text of a shared statement (cached: rendered once per text)."""
        if self.name == "postgresql":
            return text
        rendered = self._rendered.get(text)
        if rendered is None:
            rendered = self._rendered[text] = statements.sqlite_text(text)
        return rendered

    def array(self, values: Sequence[Any]) -> Any:
        """A list parameter: a PostgreSQL array, or a JSON array for SQLite."""
        return list(values) if self.name == "postgresql" else rows.dumps(list(values))

    def pairs(self, first: int, second: int) -> str:
        """Rows (a, b) zipped from two list parameters ``$first`` and ``$second``."""
        if self.name == "postgresql":
            return f"SELECT * FROM unnest(${first}::text[], ${second}::text[])"
        return (
            f"SELECT a.value, b.value FROM json_each(${first}) AS a "
            f"JOIN json_each(${second}) AS b ON b.key = a.key"
        )

    def returning(self, columns: str, alias: str) -> str:
        """A RETURNING list of ``columns`` of an UPDATE's target ``alias`` (SQLite's
        RETURNING names the target's columns unqualified)."""
        if self.name == "postgresql":
            return ", ".join(f"{alias}.{col.strip()}" for col in columns.split(","))
        return columns

    def __repr__(self) -> str:
        return f"Dialect({self.name!r})"


POSTGRES = Dialect("postgresql", one_round_trip=True, own=statements.POSTGRES_OWN)
SQLITE = Dialect("sqlite", one_round_trip=False, own=statements.SQLITE_OWN)


class Sql(abc.ABC):
    """The query primitives a backend implements; everything else is written on them.

    Each primitive counts one round trip and converts the driver's errors to
    ``StorageError`` where the driver is called (STYLE), keeping the original in
    ``__cause__`` (``PostgresStore.run`` tells a deadlock from the rest by it).
    """

    dialect: Dialect
    round_trips: RoundTrips

    @abc.abstractmethod
    async def _fetch_all(self, sql: str, *args: Any) -> list[Any]:
        """Every row of a statement (rows index by position: ``rows.Row``)."""

    @abc.abstractmethod
    async def _fetch_one(self, sql: str, *args: Any) -> Any:
        """The first row of a statement, or None."""

    @abc.abstractmethod
    async def _exec(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the rows it changed."""

    @abc.abstractmethod
    async def _exec_many(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per parameter tuple, as one round trip where the
        driver pipelines it."""
