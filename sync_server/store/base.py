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
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from protocol import Event
from protocol.jsontypes import JSON

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


class WorkflowKey(NamedTuple):
    """What identifies a workflow: its tenant and its (client-chosen) id."""

    tenant: str
    id: str


@dataclass(slots=True)
class WorkflowRecord:
    """One row of the workflow projection.

    ``state`` is the saga machine's JSON state (steps and their attempts); ``version``
    is the last ``wf_seq`` used for this workflow; ``fence`` increases on every lease
    acquisition and fences a stale owner's writes; ``workflow_version`` is the version of
    the definition the workflow started with (only instances that have it run it).
    """

    id: str
    tenant: str
    name: str
    status: str
    input: JSON = field(default_factory=dict)
    state: JSON = field(default_factory=dict)
    progress: float = 0.0
    result: JSON = None
    error: str | None = None
    version: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str | None = None
    due_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    fence: int = 0
    workflow_version: str = ""

    @property
    def key(self) -> WorkflowKey:
        """``(tenant, id)``: the workflow's identity in the store."""
        return WorkflowKey(self.tenant, self.id)


@dataclass(slots=True, frozen=True)
class NewEvent:
    """An event waiting in a transaction for its position."""

    tenant: str
    workflow_id: str
    wf_seq: int
    type: str
    data: JSON
    at: float


@dataclass(slots=True, frozen=True)
class StoredEvent:
    """An event of the log with its global position."""

    seq: int
    tenant: str
    workflow_id: str
    wf_seq: int
    type: str
    data: JSON
    at: float

    def to_wire(self) -> Event:
        """The protocol ``Event`` for this row (without tenant and wf_seq)."""
        return Event(
            seq=self.seq, workflow_id=self.workflow_id, type=self.type, data=self.data, at=self.at
        )


@dataclass(slots=True)
class OutboxItem:
    """A message for an external consumer (e.g. a completion webhook)."""

    id: int
    destination: str
    payload: JSON
    event_seq: int | None = None
    status: str = "pending"  # pending | published | dead
    retry_count: int = 0
    max_retries: int = 8
    next_retry_at: float = 0.0
    published_at: float | None = None
    last_error: str | None = None
    created_at: float = 0.0


@dataclass(slots=True)
class DlqEntry:
    """A dead letter: a step (or outbox item) that exhausted its attempts."""

    id: int
    tenant: str
    workflow_id: str
    step: str | None
    reason: str
    attempts: int
    last_error: str | None
    created_at: float
    status: str = "open"  # open | requeued | resolved
    resolved_at: float | None = None


@dataclass(slots=True)
class BreakerRecord:
    """Shared state of one circuit breaker (see ``sync_server.saga.breaker``)."""

    name: str
    state: str = "closed"  # closed | open | half_open
    failures: int = 0
    opened_at: float | None = None
    updated_at: float = 0.0
    probe_owner: str | None = None
    probe_until: float | None = None


@dataclass(slots=True)
class FencedWrite:
    """A workflow row computed from this instance's own copy, to be written only if the
    stored row is still that copy: leased to the writer with ``fence`` and at
    ``expected_version`` (every other change of a row appends an event, which bumps its
    version). ``events`` are written with it, or not at all."""

    record: WorkflowRecord
    fence: int
    expected_version: int
    events: list[NewEvent]


class RoundTrips:
    """How many times a store has waited on its database: one per statement sent
    (a pipelined ``executemany`` counts once), BEGIN and COMMIT included. On SQLite,
    which runs in-process, it counts statements the same way (``python -m bench``: the
    round trips per workflow)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class Transaction(abc.ABC):
    """A unit of work; everything in it commits together.

    Events added with ``append`` are positioned at commit; after a successful commit
    ``committed_events`` holds them with their ``seq``.
    """

    def __init__(self) -> None:
        self.pending_events: list[NewEvent] = []
        self.committed_events: list[StoredEvent] = []
        self.notifications: list[tuple[str, str]] = []

    # -- events -------------------------------------------------------------
    def append(self, workflow: WorkflowRecord, type: str, data: JSON, at: float) -> NewEvent:
        """Buffer an event of ``workflow``; bumps ``workflow.version`` (its ``wf_seq``).

        The caller must also write ``workflow`` in this transaction so the version sticks.
        """
        workflow.version += 1
        event = NewEvent(workflow.tenant, workflow.id, workflow.version, type, data, at)
        self.pending_events.append(event)
        return event

    def notify(self, channel: str, payload: str = "") -> None:
        """Send a notification to every instance's listeners after commit."""
        self.notifications.append((channel, payload))

    # -- workflows ----------------------------------------------------------
    @abc.abstractmethod
    async def get_workflow(
        self, tenant: str, workflow_id: str, *, lock: bool = True
    ) -> WorkflowRecord | None:
        """Read a tenant's workflow; with ``lock`` its row is locked until commit
        (PostgreSQL)."""

    @abc.abstractmethod
    async def insert_workflow(self, workflow: WorkflowRecord) -> bool:
        """Insert a new workflow; False (and nothing written) if the tenant already has
        that id."""

    @abc.abstractmethod
    async def update_workflow(self, workflow: WorkflowRecord) -> None:
        """Write every column of an existing workflow."""

    async def insert_workflows(self, workflows: list[WorkflowRecord]) -> set[WorkflowKey]:
        """Insert several new workflows; returns the keys inserted (an existing key is
        skipped and left unchanged). PostgreSQL does it in one round trip (batch ingest)."""
        return {w.key for w in workflows if await self.insert_workflow(w)}

    async def get_workflows(
        self, keys: list[WorkflowKey], *, lock: bool = True
    ) -> dict[WorkflowKey, WorkflowRecord]:
        """Read several workflows (key -> record; missing keys are absent), locked like
        ``get_workflow``. Backends may override this with one round trip (saga group
        commit)."""
        found: dict[WorkflowKey, WorkflowRecord] = {}
        for key in keys:
            record = await self.get_workflow(key.tenant, key.id, lock=lock)
            if record is not None:
                found[key] = record
        return found

    async def update_workflows(self, workflows: list[WorkflowRecord]) -> None:
        """``update_workflow`` for several rows; backends may batch it (saga group commit)."""
        for workflow in workflows:
            await self.update_workflow(workflow)

    async def update_fenced(self, owner: str, writes: list[FencedWrite]) -> set[WorkflowKey]:
        """Write each row still leased to ``owner`` with its fence and expected version
        and append its events; returns the keys written (the others are left alone)."""
        written: set[WorkflowKey] = set()
        for write in sorted(writes, key=lambda w: w.record.key):
            record = write.record
            current = await self.get_workflow(record.tenant, record.id, lock=True)
            if (
                current is None
                or current.lease_owner != owner
                or current.fence != write.fence
                or current.version != write.expected_version
            ):
                continue
            await self.update_workflow(record)
            self.pending_events.extend(write.events)
            written.add(record.key)
        return written

    @abc.abstractmethod
    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        """``Store.claim_due_workflows`` inside this transaction, so that the claim and
        the start of the claimed workflows' first steps commit together (saga engine:
        fewer write transactions per workflow)."""

    # -- clients ------------------------------------------------------------
    @abc.abstractmethod
    async def lock_client(self, tenant: str, subject: str, client_id: str) -> int:
        """Create-or-lock the tenant's client row and return its last applied mutation id.

        A new row is bound to ``subject`` (a row from before subjects were recorded is
        bound to the first subject that uses it).

        Raises:
            Forbidden: the client id belongs to another subject of the tenant.
        """

    @abc.abstractmethod
    async def mutation_results(
        self, tenant: str, client_id: str, ids: list[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Recorded outcome (status, error) of the given mutation ids that exist."""

    @abc.abstractmethod
    async def record_mutations(
        self,
        tenant: str,
        client_id: str,
        results: list[tuple[int, str, str | None]],
        last_id: int,
        at: float,
    ) -> None:
        """Record outcomes (id, status, error) and set the client's last applied id."""

    # -- outbox, dlq, breakers -------------------------------------------
    @abc.abstractmethod
    async def enqueue_outbox(
        self, destination: str, payload: JSON, *, event_seq: int | None, max_retries: int, at: float
    ) -> None:
        """Queue a message for an external consumer, due at once."""

    @abc.abstractmethod
    async def add_dlq(self, entry: DlqEntry) -> int:
        """Add a dead letter (``entry.id`` is ignored); returns its id."""

    @abc.abstractmethod
    async def get_dlq(self, entry_id: int, *, lock: bool = True) -> DlqEntry | None:
        """Read one dead letter."""

    @abc.abstractmethod
    async def update_dlq(self, entry: DlqEntry) -> None:
        """Write a dead letter's status fields."""

    @abc.abstractmethod
    async def get_breaker(self, name: str, *, lock: bool = True) -> BreakerRecord | None:
        """Read a circuit breaker's shared state."""

    @abc.abstractmethod
    async def put_breaker(self, breaker: BreakerRecord) -> None:
        """Insert or replace a circuit breaker's shared state."""

    # -- limits per downstream (sync_server.saga.limits) ------------------------
    @abc.abstractmethod
    async def lock_limit(
        self, name: str, now: float, *, rate: bool, lock: bool = True
    ) -> tuple[int, int, float | None]:
        """Lock limit ``name``'s row until commit (creating it) and read its usage:
        (attempts holding a valid slot — owner, fence and lease still current —, starts
        in the last second, the oldest of those). Starts are read only with ``rate``;
        without ``lock`` the usage is only read (a hint: it may be stale at once)."""

    @abc.abstractmethod
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

    @abc.abstractmethod
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
        logged (and starts older than a second are pruned)."""

    @abc.abstractmethod
    async def release_limit_slots(self, slots: list[tuple[str, str, str]]) -> set[str]:
        """Delete the slots of these (tenant, workflow id, step); returns the names of
        the limits freed (one statement for a whole checkpoint)."""

    @abc.abstractmethod
    async def drop_limit_waiters(self, tenant: str, workflow_id: str, steps: list[str]) -> None:
        """These steps no longer wait for a limit."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    async def wake_limit_waiters(
        self, name: str, count: int, now: float, alive_after: float
    ) -> None:
        """Make the first ``count`` waiters of ``name`` (fair order) due at ``now``, if no
        live lease holds their workflow (a held row is skipped, never waited for)."""


class Store(abc.ABC):
    """The event store and everything that commits with it."""

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

    # -- reads --------------------------------------------------------------
    @abc.abstractmethod
    async def read_events(
        self, after: int, limit: int, *, tenant: str | None = None
    ) -> list[StoredEvent]:
        """Events with ``seq > after`` in seq order (of one tenant, or all)."""

    @abc.abstractmethod
    async def read_workflow_events(self, tenant: str, workflow_id: str) -> list[StoredEvent]:
        """Every event of one of the tenant's workflows, in order."""

    @abc.abstractmethod
    async def head(self, tenant: str | None = None) -> int:
        """The highest committed ``seq`` (0 for an empty log) — of one tenant's events if
        ``tenant`` is given (what a client may learn: not other tenants' activity)."""

    @abc.abstractmethod
    async def get_workflow(self, tenant: str, workflow_id: str) -> WorkflowRecord | None:
        """Read one of the tenant's workflows without locking."""

    @abc.abstractmethod
    async def workflow_tenants(self, workflow_id: str, limit: int = 10) -> list[str]:
        """The tenants (at most ``limit``, sorted) holding a workflow with this id — for a
        global admin, who names a workflow by id alone."""

    @abc.abstractmethod
    async def list_workflows(
        self,
        *,
        tenant: str | None = None,
        statuses: list[str] | None = None,
        limit: int = 1000,
        name: str | None = None,
        version: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        before: tuple[float, str] | None = None,
        ended_after: float | None = None,
        ended_before: float | None = None,
    ) -> list[WorkflowRecord]:
        """Workflows, newest first (``created_at`` then ``id``, descending), filtered.

        Args:
            tenant: only this tenant's (the leading column of every listing index).
            statuses: only these statuses.
            limit: most rows.
            name: only this workflow name.
            version: only this definition version (``workflow_version``).
            created_after: only created at or after this time.
            created_before: only created before this time.
            before: keyset cursor: only rows after (``created_at``, ``id``) in this
                order — stable while new workflows are inserted.
            ended_after: only ended workflows (terminal status) whose last change —
                their end — is at or after this time.
            ended_before: only ended workflows whose end is before this time.
        """

    @abc.abstractmethod
    async def version_counts(self, *, tenant: str | None = None) -> list[tuple[str, str, str, int]]:
        """(name, version, status, count) of the workflows still running, compensating
        or parked — what each definition version still has in flight (of one tenant,
        or all)."""

    async def status_counts(self, *, tenant: str | None = None, limit: int) -> dict[str, int]:
        """Workflows by status among the newest ``limit`` (of one tenant, or all) —
        bounded work whatever the table size. Backends answer from an index."""
        counts: dict[str, int] = {}
        for record in await self.list_workflows(tenant=tenant, limit=limit):
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    @abc.abstractmethod
    async def get_client(self, tenant: str, client_id: str) -> tuple[str | None, int] | None:
        """(subject, last applied mutation id) of the tenant's client, or None; the
        subject is None for a row recorded before subjects were."""

    @abc.abstractmethod
    async def list_dlq(
        self, *, tenant: str | None = None, status: str | None = "open", limit: int = 1000
    ) -> list[DlqEntry]:
        """Dead letters, oldest first."""

    @abc.abstractmethod
    async def list_breakers(self) -> list[BreakerRecord]:
        """Every circuit breaker's shared state."""

    # -- leases (saga scheduling) ---------------------------------------------
    @abc.abstractmethod
    async def claim_due_workflows(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        versions: Sequence[tuple[str, str]] | None = None,
    ) -> list[WorkflowRecord]:
        """Lease up to ``limit`` workflows that are due and not leased by a live owner.

        With ``versions``, only workflows whose (name, ``workflow_version``) is one of
        those pairs are claimed (an instance runs only the definitions it has; rolling
        deploys); the others stay due for instances that have them.

        A workflow is due when ``due_at <= now``; it is free when it has no owner or its
        ``lease_until < now``. Each claimed row gets ``lease_owner=owner``,
        ``lease_until=now+lease_seconds`` and ``fence+1``; several instances claiming at
        once never get the same row (PostgreSQL: FOR UPDATE SKIP LOCKED).
        """

    @abc.abstractmethod
    async def renew_leases(
        self, owner: str, leases: dict[WorkflowKey, int], until: float
    ) -> set[WorkflowKey]:
        """Extend leases (workflow key -> fence) still held; returns the keys renewed."""

    @abc.abstractmethod
    async def release_leases(self, owner: str, leases: dict[WorkflowKey, int]) -> None:
        """Give up leases (workflow key -> fence) so any instance may claim them."""

    # -- outbox ---------------------------------------------------------------
    @abc.abstractmethod
    async def claim_outbox(self, now: float, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Pending outbox items due now; each is pushed ``lease_seconds`` into the future
        so that concurrent relays do not send it twice at once."""

    @abc.abstractmethod
    async def finish_outbox(self, item: OutboxItem) -> None:
        """Write an outbox item's status, retry_count, next_retry_at, published_at, error."""

    @abc.abstractmethod
    async def outbox_stats(self, now: float) -> tuple[int, float]:
        """(pending items, age in seconds of the oldest pending item)."""

    # -- backlogs (monitoring) ------------------------------------------------
    @abc.abstractmethod
    async def backlog_stats(self, now: float) -> tuple[int, float]:
        """(open dead letters, seconds the most overdue unleased running or compensating
        workflow has waited past its ``due_at``) — one cheap query each."""

    # -- retention (``sync_server.retention``) ----------------------------------
    @abc.abstractmethod
    async def horizon(self, tenant: str) -> int:
        """The tenant's retention horizon: the highest ``seq`` of its pruned events (0
        when nothing was pruned). A client whose cursor is below it may have missed
        events and must reset from current snapshots (SPEC promise 8)."""

    @abc.abstractmethod
    async def prune_events(self, cutoff: float, limit: int) -> tuple[int, int]:
        """Delete the events of the next ``limit`` workflows that ended before ``cutoff``
        (walking ``workflows_ended`` from a stored mark), in one short transaction.

        Returns:
            (workflows examined, events deleted); fewer than ``limit`` examined means
            the pruner has caught up.
        """

    @abc.abstractmethod
    async def prune_workflows(
        self, cutoff: float, limit: int, *, with_events: bool
    ) -> tuple[int, int]:
        """Delete up to ``limit`` workflow rows that ended before ``cutoff`` (and, with
        ``with_events``, whatever events of theirs are left).

        Returns:
            (workflows deleted, events deleted).
        """

    async def reclaim(self) -> None:
        """Make the space of pruned rows reusable now (PostgreSQL: a plain VACUUM of the
        pruned tables; SQLite reuses freed pages by itself). Never blocks writers.

        Raises:
            StorageError: the database failed.
        """
        return None

    @abc.abstractmethod
    async def prune_rows(self, kind: str, cutoff: float, limit: int) -> int:
        """Delete up to ``limit`` rows of ``kind`` older than ``cutoff``: ``results``
        (mutation results; each client's last applied id stays in ``clients``),
        ``outbox`` (delivered items) or ``dead_letters`` (resolved or requeued).

        Returns:
            The rows deleted.

        Raises:
            UsageError: an unknown kind.
        """

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
