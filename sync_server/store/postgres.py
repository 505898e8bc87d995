"""The PostgreSQL backend: an asyncpg pool shared by several server instances.

Theory of operation
-------------------
* **Schema.** ``?schema=NAME`` in the URL selects a schema (default ``public``); it is
  created by the first migration and set as ``search_path`` on every pool connection.
* **Units of work.** ``run(fn)`` takes a pool connection, opens a READ COMMITTED
  transaction, awaits ``fn(tx)`` and commits. A deadlock or serialization failure
  rolls back and re-runs ``fn`` in a fresh transaction after a short jittered backoff;
  any other database failure becomes ``StorageError``.
* **Gapless order** (SPEC promise 4, LESSONS "ordering in PostgreSQL"): events are
  buffered in the transaction and written by one statement just before COMMIT::

      WITH head AS (UPDATE event_head SET seq = seq + n RETURNING seq),
           ins  AS (INSERT INTO events SELECT head.seq - n + ord, … FROM unnest(…))
      SELECT head.seq, pg_notify(…)

  The ``event_head`` row lock is held until COMMIT, so a second writer waits there and
  reads the first one's head only after that commit is visible: positions are assigned
  in commit order, and a reader paging ``WHERE seq > cursor`` never sees N+1 while N is
  still invisible. The lock is held for one statement plus COMMIT, not for ``fn``.
* **Leases** (LESSONS "leases need fencing"): claims are one ``UPDATE … FROM (SELECT …
  FOR UPDATE SKIP LOCKED)`` statement that bumps ``fence``, so concurrent claimers
  never share a row; renew and release only touch rows whose owner *and* fence still
  match, so a stale owner changes nothing.
* **Notifications** are hints. One dedicated connection LISTENs on ``tether_<schema>``
  (payload ``"<channel>:<payload>"``) and dispatches to ``Store._dispatch``, for this
  instance's commits too. If that link drops, it reconnects with backoff and fires the
  ``__reconnect__`` listeners so that readers re-read from their cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from protocol import StorageError, UsageError
from sync_server.service import cancel_and_wait
from sync_server.store import pruning, rows, statements
from sync_server.store.base import (
    FencedWrite,
    Store,
    StoredEvent,
    Transaction,
    WorkflowKey,
)
from sync_server.store.dialect import Sql
from sync_server.store.migrations import migrate_postgres
from sync_server.store.pg_fenced import (
    WRITE_FENCED,
    fenced_params,
    stored_events,
    written_keys,
)
from sync_server.store.pg_transaction import (
    PG_ERRORS,
    PgConnection,
    PgSql,
    PostgresTransaction,
)

__all__ = ["PostgresStore", "PostgresTransaction", "parse_postgres_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_PG_ERRORS = PG_ERRORS
_OUR_PARAMS = ("schema", "min_size", "max_size", "connect_timeout")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (one round trip per transaction).

    It undoes session state — advisory locks, LISTEN, cursors, SET — and pool
    connections hold none: LISTEN lives on the dedicated listener connection, the
    migration lock is transaction-scoped, and settings are fixed at connect.
    """


def parse_postgres_url(url: str) -> tuple[str, dict[str, str], str]:
    """Split a Tether PostgreSQL URL into (asyncpg DSN, Tether options, safe label).

    Tether's own query parameters (``schema``, ``min_size``, ``max_size``,
    ``connect_timeout``) are removed from the DSN, since asyncpg would pass unknown
    parameters to the server as settings.

    Args:
        url: ``postgresql://user@host:port/db?schema=NAME`` (or ``postgres://``).

    Returns:
        The DSN for asyncpg, the options found, and ``host:port/db`` for messages.

    Raises:
        UsageError: the schema name is not a plain identifier.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in _OUR_PARAMS}
    rest = [(k, v) for k, v in query if k not in _OUR_PARAMS]
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    schema = options.setdefault("schema", "public")
    if not _SCHEMA_RE.fullmatch(schema):
        raise UsageError(f"schema must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*): {schema!r}")
    host = parts.hostname or "localhost"
    label = f"{host}:{parts.port or 5432}{parts.path or '/'}"
    return dsn, options, label


class PostgresStore(PgSql, Store):
    """The event store on PostgreSQL; several instances may share one schema.

    Args:
        url: ``postgresql://user@host:port/db?schema=NAME``; URL parameters ``min_size``,
            ``max_size`` and ``connect_timeout`` override the arguments below.
        min_size: pool connections kept open.
        max_size: pool connections at most.
        connect_timeout: seconds to wait for a connection before failing.
        health_interval: seconds between liveness checks of the LISTEN connection.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        health_interval: float = 10.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.multi_instance = True
        self._dsn, options, self._label = parse_postgres_url(url)
        self.schema = options["schema"]
        try:
            self._min_size = int(options.get("min_size", min_size))
            self._max_size = int(options.get("max_size", max_size))
            self._connect_timeout = float(options.get("connect_timeout", connect_timeout))
        except ValueError as exc:
            raise UsageError(f"bad pool option in {self._label}: {exc}") from exc
        self._health_interval = health_interval
        self._channel = f"tether_{self.schema}"
        self._pool: asyncpg.Pool | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._closing = False

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        """Connect the pool, apply pending migrations and start listening.

        Raises:
            StorageError: PostgreSQL is unreachable (within ``connect_timeout``) or the
                schema holds a newer or foreign layout.
        """
        if self._pool is not None:
            return
        self._closing = False
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                # JIT off: it compiles any plan whose (generic) cost estimate is high, at
                # 10-200 ms a time — ruinous for short OLTP statements.
                server_settings={
                    "search_path": f'"{self.schema}"',
                    "application_name": "tether",
                    "jit": "off",
                },
                reset=_no_reset,
            )
        except _PG_ERRORS as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {self._label}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await migrate_postgres(conn, self.schema)
            listener = await self._connect_listener()
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, _PG_ERRORS):
                raise StorageError(
                    f"cannot prepare schema {self.schema!r} at {self._label}: {exc}"
                ) from exc
            raise
        self._pool, self._listener = pool, listener
        self._listener_task = asyncio.create_task(
            self._supervise_listener(), name=f"tether-listen-{self.schema}"
        )

    async def close(self) -> None:
        """Stop listening and close the pool; idempotent."""
        self._closing = True
        task, self._listener_task = self._listener_task, None
        await cancel_and_wait(task)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (TimeoutError, *_PG_ERRORS):
                pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise UsageError("the store is not open (call await store.open() first)")
        return self._pool

    # -- notifications ----------------------------------------------------------
    async def _connect_listener(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": f"tether-listen:{self.schema}"},
        )
        try:
            await conn.add_listener(self._channel, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _on_notification(
        self, _conn: PgConnection, _pid: int, _channel: str, payload: object
    ) -> None:
        channel, _, body = str(payload).partition(":")
        self._dispatch(channel, body)

    async def _supervise_listener(self) -> None:
        """Keep one LISTEN connection alive; after a loss, reconnect and announce it."""
        backoff = 0.05
        while True:
            conn = self._listener
            assert conn is not None
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await self._watch(conn, lost)
            conn.terminate()
            # LESSONS "LISTEN/NOTIFY drops notifications while a listener is
            # disconnected": reconnect, then tell listeners to re-read the store.
            log.warning("notification link to %s lost; reconnecting", self._label)
            while True:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                try:
                    self._listener = await self._connect_listener()
                    break
                except _PG_ERRORS as exc:
                    backoff = min(backoff * 2, 5.0)
                    log.warning("notification link to %s still down: %s", self._label, exc)
            backoff = 0.05
            self._dispatch("__reconnect__", "")

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when ``conn`` is lost or stops answering a periodic ``SELECT 1``."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=self._health_interval)
                return
            try:
                await conn.fetchval("SELECT 1", timeout=self._connect_timeout)
            except _PG_ERRORS:
                return

    # -- units of work ------------------------------------------------------------
    async def run(self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = 5) -> T:
        """Run ``fn`` in a transaction and commit; re-run on deadlock/serialization.

        Args:
            fn: the unit of work; it may run more than once, so it must have no
                effects outside the transaction.
            attempts: how many times to try in all.

        Returns:
            What ``fn`` returned (from the attempt that committed).

        Raises:
            StorageError: the database failed (after ``attempts`` for conflicts).
        """
        pool = self._require_pool()
        for attempt in range(1, attempts + 1):
            try:
                async with pool.acquire() as conn:
                    tx = PostgresTransaction(conn, self.round_trips)
                    self.round_trips.count += 2  # BEGIN and COMMIT
                    try:
                        async with conn.transaction():
                            result = await fn(tx)
                            stored = await tx._write_events_and_notify(self._channel)
                    except _PG_ERRORS as exc:
                        raise StorageError(f"PostgreSQL transaction failed: {exc}") from exc
            except StorageError as exc:
                if attempt < attempts and isinstance(exc.__cause__, _CONFLICTS):
                    await asyncio.sleep(random.uniform(0.5, 1.5) * 0.002 * 2**attempt)
                    continue
                raise
            except _PG_ERRORS as exc:  # acquiring or releasing the connection
                raise StorageError(f"PostgreSQL unavailable at {self._label}: {exc}") from exc
            tx.committed_events = stored
            if stored:
                self._committed(stored)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def write_fenced(
        self, owner: str, writes: list[FencedWrite], notifications: list[tuple[str, str]]
    ) -> set[WorkflowKey]:
        """The fenced checkpoint in one statement (``sync_server.store.pg_fenced``)."""
        if not writes:
            return set()
        row = await self._fetchrow(
            WRITE_FENCED, *fenced_params(owner, writes, self._channel, notifications)
        )
        assert row is not None
        written = written_keys(row[0])
        if row[1] is not None:
            self._committed(stored_events(writes, written, int(row[1])))
        return written

    async def notify(self, channel: str, payload: str = "") -> None:
        """One ``pg_notify`` outside any transaction (every instance hears it)."""
        await self._fetchval("SELECT pg_notify($1, $2)", self._channel, f"{channel}:{payload}")

    async def _one_shot(self, work: Callable[[Sql], Awaitable[T]]) -> T:
        """A single-statement write on a pool connection: its own implicit transaction,
        one round trip (no BEGIN/COMMIT)."""
        return await work(self)

    # -- reads ------------------------------------------------------------------
    def _executor(self) -> asyncpg.Pool:
        return self._require_pool()

    async def read_events(
        self, after: int, limit: int, *, tenant: str | None = None
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in seq order (of one tenant, or all)."""
        if tenant is None:
            found = await self._fetch(statements.READ_EVENTS, after, limit)
        else:
            found = await self._fetch(statements.READ_TENANT_EVENTS, tenant, after, limit)
        return [rows.event_from_row(row) for row in found]

    async def head(self, tenant: str | None = None) -> int:
        """The highest committed ``seq`` (0 for an empty log), of all or one tenant."""
        if tenant is not None:
            return int(await self._fetchval(statements.PG_TENANT_HEAD, tenant))
        return int(await self._fetchval("SELECT seq FROM event_head WHERE id = 1"))

    # -- leases -----------------------------------------------------------------
    async def renew_leases(
        self, owner: str, leases: dict[WorkflowKey, int], until: float
    ) -> set[WorkflowKey]:
        """Extend leases (key -> fence) still held with the same fence; returns those keys."""
        if not leases:
            return set()
        found = await self._fetch(
            statements.PG_RENEW_LEASES,
            owner,
            [k.id for k in leases],
            [k.tenant for k in leases],
            list(leases.values()),
            until,
        )
        return {WorkflowKey(row[0], row[1]) for row in found}

    async def release_leases(self, owner: str, leases: dict[WorkflowKey, int]) -> None:
        """Give up leases (key -> fence) still held with the same fence."""
        if not leases:
            return
        await self._execute(
            statements.PG_RELEASE_LEASES,
            owner,
            [k.id for k in leases],
            [k.tenant for k in leases],
            list(leases.values()),
        )

    async def reclaim(self) -> None:
        """VACUUM the pruned tables (not FULL: writers never wait for it), so their
        freed space is reused before autovacuum's thresholds and naptime come round."""
        for table in pruning.PRUNED_TABLES:
            await self._execute(f"VACUUM (SKIP_LOCKED) {table}")
