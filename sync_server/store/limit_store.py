"""The limit operations of a transaction (see ``sync_server.saga.limits``), written once.

Mixed into ``Transaction`` over the ``Sql`` primitives; the SQL itself is shared
(``limit_sql``) and rendered by the backend's ``Dialect``. Where PostgreSQL pays a
round trip per statement (``Dialect.one_round_trip``) several steps travel as one
combined statement; SQLite runs them one by one (in-process, nothing to save).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sync_server.store import limit_sql as q
from sync_server.store import rows
from sync_server.store.dialect import Sql
from sync_server.store.records import WorkflowRecord

__all__ = ["LimitOps"]


class LimitOps(Sql):
    """Limit operations: the limit's row is locked with the upsert (PostgreSQL) or the
    database write lock is held (SQLite), so counting and taking cannot race."""

    async def lock_limit(
        self, name: str, now: float, *, rate: bool, lock: bool = True
    ) -> tuple[int, int, float | None]:
        """Lock limit ``name``'s row until commit (creating it) and read its usage:
        (attempts holding a valid slot — owner, fence and lease still current —, starts
        in the last second, the oldest of those). Starts are read only with ``rate``;
        without ``lock`` the usage is only read (a hint: it may be stale at once)."""
        sql = self.dialect.sql
        # Lock first, read after: a statement's snapshot predates a lock wait, so the
        # counts must come from a later statement to include what the holder committed.
        if lock:
            await self._exec(sql(q.LOCK_LIMIT), name, now)
        running: Any
        if self.dialect.one_round_trip:
            row = await self._fetch_one(q.PG_USAGE, name, now, now - q.RATE_WINDOW)
            assert row is not None
            running, count, oldest = row[0], row[1], row[2]
        else:
            (running,) = await self._row_of(sql(q.RUNNING_SLOTS), name, now)
            if not rate:
                return int(running), 0, None
            count, oldest = await self._row_of(sql(q.LIMIT_STARTS), name, now - q.RATE_WINDOW)
        if not rate:
            return int(running), 0, None
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
        """Queue the step as a waiter of ``name`` (or mark it seen at ``now``) and return
        its 0-based place in fair order: round-robin across tenants, each tenant's
        waiters by ``created_at``; waiters not seen since ``alive_after`` are ignored."""
        sql, served = self.dialect.sql, now - q.FAIR_WINDOW
        if self.dialect.one_round_trip:
            found = await self._fetch_all(
                q.PG_POSITION, name, tenant, workflow_id, step, created_at, now, alive_after, served
            )
            rank: Any = int(found[0][3]) if found else 0
        else:
            await self._exec(sql(q.UPSERT_WAITER), name, tenant, workflow_id, step, created_at, now)
            (rank,) = await self._row_of(
                sql(q.WAITER_RANK), name, tenant, alive_after, created_at, workflow_id, step
            )
            found = await self._fetch_all(sql(q.WAITER_COUNTS), name, alive_after, served)
        return q.fair_position(tenant, int(rank), [(r[0], int(r[1]), int(r[2])) for r in found])

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
        """The waiter becomes a slot holder under (``owner``, ``fence``); a start is
        logged (and starts older than the fair window are pruned)."""
        sql, served = self.dialect.sql, now - q.FAIR_WINDOW
        if self.dialect.one_round_trip:
            await self._exec(q.PG_TAKE, name, tenant, workflow_id, step, owner, fence, now, served)
            return
        await self._exec(sql(q.TAKE_WAITER), name, tenant, workflow_id, step)
        await self._exec(sql(q.TAKE_SLOT), name, tenant, workflow_id, step, owner, fence, now)
        await self._exec(sql(q.PRUNE_STARTS), name, served)
        await self._exec(sql(q.LOG_START), name, tenant, now)

    async def release_limit_slots(self, slots: list[tuple[str, str, str]]) -> set[str]:
        """Delete the slots of these (tenant, workflow id, step); returns the names of
        the limits freed (one statement for a whole checkpoint)."""
        if self.dialect.one_round_trip:
            found = await self._fetch_all(
                q.RELEASE_SLOTS,
                [t for t, _, _ in slots],
                [w for _, w, _ in slots],
                [s for *_, s in slots],
            )
        else:
            found = await self._fetch_all(
                q.SQLITE_RELEASE_SLOTS, rows.dumps([list(x) for x in slots])
            )
        return {row[0] for row in found}

    async def drop_limit_waiters(self, tenant: str, workflow_id: str, steps: list[str]) -> None:
        """These steps no longer wait for a limit."""
        await self._exec(
            self.dialect.sql(q.DROP_WAITERS), tenant, workflow_id, self.dialect.array(steps)
        )

    async def wake_limit_waiters(
        self, name: str, count: int, now: float, alive_after: float
    ) -> None:
        """Make the first ``count`` waiters of ``name`` (fair order) due at ``now``, if no
        live lease holds their workflow (a held row is skipped, never waited for)."""
        await self._exec(
            self.dialect.sql(q.WAKE_WAITERS), name, alive_after, count, now, now - q.FAIR_WINDOW
        )

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
        """Lease (like a claim: fence + 1) up to ``count`` of the first waiters of
        ``name`` in fair order whose workflow is of one of ``versions`` and not held by a
        live lease — skipping rows another transaction holds — and return them."""
        found = await self._fetch_all(
            q.handoff(self.dialect),
            name,
            alive_after,
            count,
            now,
            now - q.FAIR_WINDOW,
            self.dialect.array([n for n, _ in versions]),
            self.dialect.array([v for _, v in versions]),
            owner,
            lease_until,
        )
        return [rows.workflow_from_row(row) for row in found]

    async def _row_of(self, sql: str, *args: Any) -> tuple[Any, ...]:
        row = await self._fetch_one(sql, *args)
        assert row is not None  # an aggregate always has its row
        return tuple(row)
