"""The limit operations of ``Transaction`` (see ``sync_server.saga.limits``) per backend.

Mixed into ``PostgresTransaction`` and ``SqliteTransaction``; the SQL itself is shared
(``limit_sql``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sync_server.store import limit_sql as q
from sync_server.store import rows
from sync_server.store.base import WorkflowRecord

_PG_HANDOFF = q.PG_HANDOFF + ", ".join(f"w.{c.strip()}" for c in rows.WORKFLOW_COLUMNS.split(","))
# SQLite: the pairs as a JSON array of [name, version]; no row locks (write lock held).
_SQLITE_HANDOFF = (
    q.sqlite_style(
        q.HANDOFF.replace(
            "(SELECT * FROM unnest($6::text[], $7::text[]))",
            "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($6))",
        )
        .replace("UPDATE workflows AS w SET", "UPDATE workflows SET")
        .replace("fence = w.fence + 1", "fence = fence + 1")
        .replace("$8", "$7")
        .replace("$9", "$8")
        .replace(
            "WHERE w.id = pick.id AND w.tenant = pick.tenant",
            "WHERE workflows.id = pick.id AND workflows.tenant = pick.tenant",
        )
    )
    + rows.WORKFLOW_COLUMNS
)

__all__ = ["PgLimits", "SqliteLimits"]

_S = {
    name: q.sqlite_style(getattr(q, name))
    for name in q.__all__
    if name not in ("sqlite_style", "fair_position", "RATE_WINDOW", "FAIR_WINDOW")
    and not name.startswith("PG_")
    and name not in ("HANDOFF", "RELEASE_SLOTS", "SQLITE_RELEASE_SLOTS")
}


class PgLimits:
    """Limit operations on PostgreSQL (the limit row is locked with the upsert).

    A mixin: ``PgSql`` (listed before it) provides the query helpers.
    """

    async def _execute(self, sql: str, *args: Any) -> str:
        raise NotImplementedError

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        raise NotImplementedError

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        raise NotImplementedError

    async def lock_limit(
        self, name: str, now: float, *, rate: bool, lock: bool = True
    ) -> tuple[int, int, float | None]:
        """See ``Transaction.lock_limit``."""
        # Lock first, read after: a statement's snapshot predates a lock wait, so the
        # counts must come from a later statement to include what the holder committed.
        if lock:
            await self._execute(q.LOCK_LIMIT, name, now)
        row = await self._fetchrow(q.PG_USAGE, name, now, now - q.RATE_WINDOW)
        assert row is not None
        if not rate:
            return int(row[0]), 0, None
        return int(row[0]), int(row[1]), None if row[2] is None else float(row[2])

    async def limit_position(
        self,
        name: str,
        tenant: str,
        workflow_id: str,
        step: str,
        created_at: float,
        now: float,
        alive_after: float,
    ) -> int:
        """See ``Transaction.limit_position``."""
        found = await self._fetch(
            q.PG_POSITION,
            name,
            tenant,
            workflow_id,
            step,
            created_at,
            now,
            alive_after,
            now - q.FAIR_WINDOW,
        )
        rank = int(found[0][3]) if found else 0
        return q.fair_position(tenant, rank, [(r[0], int(r[1]), int(r[2])) for r in found])

    async def take_limit_slot(
        self,
        name: str,
        tenant: str,
        workflow_id: str,
        step: str,
        owner: str,
        fence: int,
        now: float,
    ) -> None:
        """See ``Transaction.take_limit_slot``."""
        await self._execute(
            q.PG_TAKE, name, tenant, workflow_id, step, owner, fence, now, now - q.FAIR_WINDOW
        )

    async def release_limit_slots(self, slots: list[tuple[str, str, str]]) -> set[str]:
        """See ``Transaction.release_limit_slots``."""
        found = await self._fetch(
            q.RELEASE_SLOTS,
            [t for t, _, _ in slots],
            [w for _, w, _ in slots],
            [s for *_, s in slots],
        )
        return {row[0] for row in found}

    async def drop_limit_waiters(self, tenant: str, workflow_id: str, steps: list[str]) -> None:
        """See ``Transaction.drop_limit_waiters``."""
        await self._execute(q.DROP_WAITERS, tenant, workflow_id, steps)

    async def wake_limit_waiters(
        self, name: str, count: int, now: float, alive_after: float
    ) -> None:
        """See ``Transaction.wake_limit_waiters``."""
        await self._execute(q.WAKE_WAITERS, name, alive_after, count, now, now - q.FAIR_WINDOW)

    async def claim_limit_waiters(
        self,
        name: str,
        count: int,
        now: float,
        alive_after: float,
        versions: Sequence[tuple[str, str]],
        owner: str,
        lease_until: float,
    ) -> list[WorkflowRecord]:
        """See ``Transaction.claim_limit_waiters``."""
        found = await self._fetch(
            _PG_HANDOFF,
            name,
            alive_after,
            count,
            now,
            now - q.FAIR_WINDOW,
            [n for n, _ in versions],
            [v for _, v in versions],
            owner,
            lease_until,
        )
        return [rows.workflow_from_row(row) for row in found]


class SqliteLimits:
    """Limit operations on SQLite (the database write lock is held).

    A mixin: ``SqliteSql`` (listed before it) provides the query helpers.
    """

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def lock_limit(
        self, name: str, now: float, *, rate: bool, lock: bool = True
    ) -> tuple[int, int, float | None]:
        """See ``Transaction.lock_limit``."""
        if lock:
            self._execute(_S["LOCK_LIMIT"], (name, now))
        (running,) = self._one(_S["RUNNING_SLOTS"], (name, now))
        if not rate:
            return int(running), 0, None
        count, oldest = self._one(_S["LIMIT_STARTS"], (name, now - q.RATE_WINDOW))
        return int(running), int(count), None if oldest is None else float(oldest)

    async def limit_position(
        self,
        name: str,
        tenant: str,
        workflow_id: str,
        step: str,
        created_at: float,
        now: float,
        alive_after: float,
    ) -> int:
        """See ``Transaction.limit_position``."""
        self._execute(_S["UPSERT_WAITER"], (name, tenant, workflow_id, step, created_at, now))
        (rank,) = self._one(
            _S["WAITER_RANK"], (name, tenant, alive_after, created_at, workflow_id, step)
        )
        counts = self._all(_S["WAITER_COUNTS"], (name, alive_after, now - q.FAIR_WINDOW))
        return q.fair_position(tenant, int(rank), [(r[0], int(r[1]), int(r[2])) for r in counts])

    async def take_limit_slot(
        self,
        name: str,
        tenant: str,
        workflow_id: str,
        step: str,
        owner: str,
        fence: int,
        now: float,
    ) -> None:
        """See ``Transaction.take_limit_slot``."""
        self._execute(_S["TAKE_WAITER"], (name, tenant, workflow_id, step))
        self._execute(_S["TAKE_SLOT"], (name, tenant, workflow_id, step, owner, fence, now))
        self._execute(_S["PRUNE_STARTS"], (name, now - q.FAIR_WINDOW))
        self._execute(_S["LOG_START"], (name, tenant, now))

    async def release_limit_slots(self, slots: list[tuple[str, str, str]]) -> set[str]:
        """See ``Transaction.release_limit_slots``."""
        found = self._all(q.SQLITE_RELEASE_SLOTS, (rows.dumps([list(x) for x in slots]),))
        return {row[0] for row in found}

    async def drop_limit_waiters(self, tenant: str, workflow_id: str, steps: list[str]) -> None:
        """See ``Transaction.drop_limit_waiters``."""
        self._execute(_S["DROP_WAITERS"], (tenant, workflow_id, rows.dumps(steps)))

    async def wake_limit_waiters(
        self, name: str, count: int, now: float, alive_after: float
    ) -> None:
        """See ``Transaction.wake_limit_waiters``."""
        self._execute(_S["WAKE_WAITERS"], (name, alive_after, count, now, now - q.FAIR_WINDOW))

    async def claim_limit_waiters(
        self,
        name: str,
        count: int,
        now: float,
        alive_after: float,
        versions: Sequence[tuple[str, str]],
        owner: str,
        lease_until: float,
    ) -> list[WorkflowRecord]:
        """See ``Transaction.claim_limit_waiters``."""
        found = self._all(
            _SQLITE_HANDOFF,
            (
                name,
                alive_after,
                count,
                now,
                now - q.FAIR_WINDOW,
                rows.dumps([list(pair) for pair in versions]),
                owner,
                lease_until,
            ),
        )
        return [rows.workflow_from_row(row) for row in found]
