"""The fenced checkpoint on PostgreSQL: one statement, one round trip, its own transaction.

Theory of operation
-------------------
A saga runner that holds a workflow's lease computes the next row from its own copy
(``Store.write_fenced``). The statement below writes every row of the batch whose stored
``lease_owner``, ``fence`` and ``version`` are still those the copy was made from — the
fence check is the UPDATE's WHERE clause, so there is no separate locked read — and then,
in the same statement, appends the events of exactly the rows written:

1. ``w`` updates the rows that pass the fence and version check (row locks until COMMIT);
2. ``e`` keeps the events of the written rows, numbered in their original order;
3. ``head`` bumps the one-row ``event_head`` by that count (its row lock until COMMIT:
   the gapless-order mechanism of SPEC promise 4, as in ``_APPEND_EVENTS``) — only when
   there is an event to place, so a fully refused batch takes no lock;
4. ``ins`` inserts the events at ``head - count + n``;
5. the notifications are queued (delivered at COMMIT, which follows at once: the
   statement runs outside an explicit transaction).

Rows that fail the check are left alone; the caller re-runs them through the locked
checkpoint, which refuses a stale owner or recomputes from the changed row.
"""

from __future__ import annotations

from sync_server.store import rows
from sync_server.store.base import FencedWrite, StoredEvent, WorkflowKey

__all__ = ["WRITE_FENCED", "fenced_params", "stored_events", "written_keys"]

WRITE_FENCED = """
WITH w AS (
    UPDATE workflows AS t SET status = u.status, state = u.state, progress = u.progress,
        result = u.result, error = u.error, version = u.version, updated_at = u.updated_at,
        due_at = u.due_at, lease_owner = u.lease_owner, lease_until = u.lease_until
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                $6::float8[], $7::text[], $8::text[], $9::bigint[], $10::float8[],
                $11::float8[], $12::text[], $13::float8[], $23::text[])
         AS u(id, fence, old_version, status, state, progress, result, error, version,
              updated_at, due_at, lease_owner, lease_until, tenant)
    WHERE t.tenant = u.tenant AND t.id = u.id AND t.lease_owner = $14
      AND t.fence = u.fence AND t.version = u.old_version
    RETURNING t.tenant, t.id
), e AS MATERIALIZED (
    SELECT x.tenant, x.workflow_id, x.wf_seq, x.type, x.data, x.at,
           row_number() OVER (ORDER BY x.ord) AS n
    FROM unnest($15::text[], $16::text[], $17::bigint[], $18::text[], $19::text[],
                $20::float8[]) WITH ORDINALITY AS x(tenant, workflow_id, wf_seq, type,
                                                    data, at, ord)
    WHERE (x.tenant, x.workflow_id) IN (SELECT tenant, id FROM w)
), head AS (
    UPDATE event_head SET seq = seq + (SELECT count(*) FROM e)
    WHERE id = 1 AND EXISTS (SELECT 1 FROM e) RETURNING seq
), ins AS (
    INSERT INTO events (seq, tenant, workflow_id, wf_seq, type, data, at)
    SELECT head.seq - (SELECT count(*) FROM e) + e.n, e.tenant, e.workflow_id, e.wf_seq,
           e.type, e.data, e.at
    FROM head, e
)
SELECT (SELECT json_agg(json_build_array(tenant, id)) FROM w)::text AS written,
       (SELECT seq FROM head) AS head,
       (SELECT count(pg_notify($21, n)) FROM unnest(
            CASE WHEN EXISTS (SELECT 1 FROM w) THEN $22::text[] ELSE '{}'::text[] END
            || CASE WHEN (SELECT seq FROM head) IS NULL THEN '{}'::text[]
                    ELSE ARRAY['events:' || (SELECT seq FROM head)] END) AS n) AS sent
"""


def fenced_params(
    owner: str, writes: list[FencedWrite], channel: str, notifications: list[tuple[str, str]]
) -> list[object]:
    """The arguments of ``WRITE_FENCED`` (rows in id order, events in append order)."""
    ordered = sorted(writes, key=lambda w: w.record.key)
    recs = [w.record for w in ordered]
    events = [e for w in ordered for e in w.events]
    return [
        [r.id for r in recs],
        [w.fence for w in ordered],
        [w.expected_version for w in ordered],
        [r.status for r in recs],
        [rows.dumps(r.state) for r in recs],
        [float(r.progress) for r in recs],
        [rows.dumps(r.result) for r in recs],
        [r.error for r in recs],
        [r.version for r in recs],
        [float(r.updated_at) for r in recs],
        [None if r.due_at is None else float(r.due_at) for r in recs],
        [r.lease_owner for r in recs],
        [None if r.lease_until is None else float(r.lease_until) for r in recs],
        owner,
        [e.tenant for e in events],
        [e.workflow_id for e in events],
        [e.wf_seq for e in events],
        [e.type for e in events],
        [rows.dumps(e.data) for e in events],
        [float(e.at) for e in events],
        channel,
        [f"{name}:{payload}" for name, payload in notifications],
        [r.tenant for r in recs],
    ]


def written_keys(text: str | None) -> set[WorkflowKey]:
    """The ``written`` column: a JSON array of [tenant, id] pairs (NULL: none)."""
    return {WorkflowKey(t, i) for t, i in rows.loads(text) or []}


def stored_events(
    writes: list[FencedWrite], written: set[WorkflowKey], head: int
) -> list[StoredEvent]:
    """The positions the statement gave the events of the rows written."""
    ordered = sorted(writes, key=lambda w: w.record.key)
    events = [e for w in ordered if w.record.key in written for e in w.events]
    first = head - len(events)
    return [
        StoredEvent(first + i, e.tenant, e.workflow_id, e.wf_seq, e.type, e.data, e.at)
        for i, e in enumerate(events, start=1)
    ]
