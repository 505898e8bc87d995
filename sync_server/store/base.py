"""The storage interface of the sync server: one small ABC, two backends.

Theory of operation
-------------------
All state lives in a handful of tables (see ``schema`` in each backend):

* ``events`` — the append-only log. ``seq`` is the global, gapless cursor; ``wf_seq``
  numbers the events of one workflow (1, 2, …); ``tenant`` scopes reads.
* ``workflows`` — the projection: one row per workflow, its saga state as JSON, the
  schedule (``due_at``) and the lease (``lease_owner``, ``lease_until``, ``fence``).
* ``clients`` and ``mutation_results`` — per-client last applied mutation id, the
  subject the client id belongs to, and the outcome of every applied mutation (a
  resent mutation is answered from here).

Namespacing (SPEC promise 6): workflow ids and client ids are chosen by clients, so they
are unique only *within a tenant*. Every table keys them by ``(tenant, id)`` and every
lookup names the tenant (a ``WorkflowKey``); another tenant's use of the same id is
simply another row, so nothing one tenant does with an id reveals or blocks another's.
* ``outbox`` — messages for external consumers, relayed with retries.
* ``dlq`` — the dead-letter queue. ``breakers`` — circuit breakers shared by instances.

Every change goes through a ``Transaction`` (a unit of work): the effect and its
bookkeeping (last mutation id, events, projection, outbox) commit together or not at
all (SPEC promises 1 and 3).

Gapless order (SPEC promise 4): events appended in a transaction are *buffered* and
written as the last statements before COMMIT. Positions are assigned under a lock that
is held until COMMIT (PostgreSQL: a row lock on the single-row ``event_head`` table;
SQLite: the database write lock), so transactions take positions in commit order and a
reader paging ``WHERE seq > cursor`` can never see seq N+1 before seq N is visible.

Callers run their unit of work through ``Store.run(fn)``, which retries ``fn`` on a
deadlock or serialization failure; ``fn`` must therefore be free of outside effects.

Layers
------
The interface is narrow: a backend implements four query primitives (``Sql``: fetch
all, fetch one, execute, execute many) on a transaction and on the store, ``run``
(BEGIN … the buffered events' positions … COMMIT), ``read_events`` and ``head``, and
the few batches it moves its own way. Every domain operation — and the rules of
tenancy, claim order and fencing — is written once above them: ``transaction``
(``Transaction``), ``limit_store`` (limits), ``store_ops`` (``Store``'s reads, leases,
outbox, backlogs), ``pruning`` (retention), over shared SQL that the backend's
``Dialect`` renders (``dialect``, ``statements``). The row types are in ``records``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sync_server.store.records import (
    BreakerRecord,
    DlqEntry,
    FencedWrite,
    NewEvent,
    OutboxItem,
    RoundTrips,
    StoredEvent,
    WorkflowKey,
    WorkflowRecord,
)
from sync_server.store.store_ops import StoreOps
from sync_server.store.transaction import Transaction

__all__ = [
    "BreakerRecord",
    "DlqEntry",
    "FencedWrite",
    "NewEvent",
    "OutboxItem",
    "RoundTrips",
    "Store",
    "StoredEvent",
    "Transaction",
    "WorkflowKey",
    "WorkflowRecord",
]

T = TypeVar("T")
_log = logging.getLogger(__name__)


class Store(StoreOps):
    """The event store and everything that commits with it.

    A backend implements the ``Sql`` primitives (for reads outside a unit of work),
    ``open``/``close``, ``run`` and ``_one_shot`` (units of work), ``read_events`` and
    ``head`` (the log, the hottest reads), and lease upkeep; the rest is ``StoreOps``.
    """

    url: str
    multi_instance: bool = False
    """True when other processes share this store and hear its notifications."""

    def __init__(self) -> None:
        self.round_trips = RoundTrips()
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        self._commit_listeners: list[Callable[[list[StoredEvent]], None]] = []

    # -- lifecycle ----------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending schema migrations.

        Raises:
            StorageError: the database is unreachable or the schema is foreign.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; idempotent."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- units of work ------------------------------------------------------
    @abc.abstractmethod
    async def run(self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = 5) -> T:
        """Run ``fn`` in a transaction and commit; retried on deadlock/serialization.

        Notifications queued with ``Transaction.notify`` are delivered after commit.

        Raises:
            StorageError: the database failed (after retries where retrying helps).
        """

    async def write_fenced(
        self, owner: str, writes: list[FencedWrite], notifications: list[tuple[str, str]]
    ) -> set[WorkflowKey]:
        """Fenced checkpoint without a locked read: write each row (with its events) that
        is still leased to ``owner`` at the fence and version its writer computed from;
        returns the keys written. ``notifications`` are sent if anything was written.
        PostgreSQL does it in one statement (one round trip, its own transaction).

        Raises:
            StorageError: the database failed; nothing was written.
        """

        async def unit(tx: Transaction) -> set[WorkflowKey]:
            written = await tx.update_fenced(owner, writes)
            if written:
                tx.notifications.extend(notifications)
            return written

        return await self.run(unit)

    # -- the backend's own reads --------------------------------------------
    @abc.abstractmethod
    async def read_events(
        self, after: int, limit: int, *, tenant: str | None = None
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in seq order (of one tenant, or all)."""

    @abc.abstractmethod
    async def head(self, tenant: str | None = None) -> int:
        """The highest committed ``seq`` (0 for an empty log) — of one tenant's events if
        ``tenant`` is given (what a client may learn: not other tenants' activity)."""

    async def reclaim(self) -> None:
        """Make the space of pruned rows reusable now (PostgreSQL: a plain VACUUM of the
        pruned tables; SQLite reuses freed pages by itself). Never blocks writers.

        Raises:
            StorageError: the database failed.
        """
        return None

    # -- notifications --------------------------------------------------------
    async def notify(self, channel: str, payload: str = "") -> None:
        """Send a notification outside any unit of work (e.g. ephemeral progress).

        Raises:
            StorageError: the database failed.
        """

        async def unit(tx: Transaction) -> None:
            tx.notify(channel, payload)

        await self.run(unit)

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` on every notification on ``channel``.

        SQLite delivers within the process; PostgreSQL through LISTEN/NOTIFY, from every
        instance. Notifications are hints: a listener must re-read the store.
        """
        self._listeners.setdefault(channel, []).append(callback)

    def unlisten(self, channel: str, callback: Callable[[str], None]) -> None:
        """Stop calling ``callback`` for ``channel``."""
        callbacks = self._listeners.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)

    def _dispatch(self, channel: str, payload: str) -> None:
        # Called after a commit: a failing listener must neither hide the commit from
        # the caller (who might then retry it) nor starve the other listeners.
        for callback in list(self._listeners.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                _log.exception("listener for %r failed", channel)

    def on_commit(self, callback: Callable[[list[StoredEvent]], None]) -> None:
        """Call ``callback(events)`` with the events of every transaction this process
        commits, right after COMMIT (a local fast path; other instances' events arrive
        only through notifications and reads)."""
        self._commit_listeners.append(callback)

    def _committed(self, events: list[StoredEvent]) -> None:
        for callback in list(self._commit_listeners):
            try:
                callback(events)
            except Exception:
                _log.exception("a commit listener failed")

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after the notification link was lost and restored.

        Notifications sent meanwhile are gone, so listeners should re-read the store.
        """
        self._listeners.setdefault("__reconnect__", []).append(lambda _payload: callback())
