"""Apply pushed mutations exactly once (SPEC promises 1, 6 and 7).

One push batch is one transaction: the client's row is locked, every mutation is
checked against the last applied id, applied or rejected, and its outcome and the new
last id are recorded together with the effects. A resent mutation (id <= last) is
answered ``duplicate`` with the error of its original outcome — also when the same id
appears twice in one batch (the first copy counts); a mutation whose id skips ahead is
refused with code ``gap`` (and, for older clients, a ``conflict:`` reason) and nothing
after the gap is applied or recorded; a fresh rejection carries its error's code.
A mutation that fails validation is ``rejected``: it changes nothing but is recorded,
so the client can roll its optimistic change back and never resend it.

Identity (SPEC promise 6): client ids and workflow ids are the tenant's own — every
lookup is by ``(tenant, id)``, so another tenant's use of the same id is simply another
client or workflow. Within a tenant, a client id belongs to the subject that first used
it; another subject is refused (``Forbidden``) before anything is applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from protocol import (
    CancelWorkflowArgs,
    Forbidden,
    Mutation,
    MutationResult,
    MutationStatus,
    NotFound,
    ReportStateArgs,
    RetryWorkflowArgs,
    Role,
    Source,
    StorageError,
    SubmitWorkflowArgs,
    TetherError,
    Unavailable,
    ValidationError,
    limits,
    parse_mutation_args,
)
from protocol.codec import MutationArgs
from protocol.messages import CONFLICT_PREFIX, GAP
from sync_server import tracing
from sync_server.auth import Principal
from sync_server.saga import intake
from sync_server.saga.storable import refused_by_database, storable_text
from sync_server.store.base import Store, Transaction, WorkflowKey, WorkflowRecord

if TYPE_CHECKING:
    from protocol.flags import FlagBook
    from sync_server.flags.service import FlagService

__all__ = ["MAX_INPUT_BYTES", "MutationApplier"]

MAX_INPUT_BYTES = limits.MAX_INPUT_BYTES
"""Largest encoded workflow input accepted (``protocol.limits``)."""

ADOPT_MAX_SUBMITS = 16
"""A push with at most this many submits, when no other push is in flight, has their
claim ride on its own transaction (if this instance's runner has room): the latency of a
lone submit drops by a whole claim transaction. Larger batches and concurrent pushes are
left to the claimer, which claims in batches of its own outside the pushes (measured:
adopting pushes of 100 halved B2's ingest with sagas on)."""

ReportHandler = Callable[[Transaction, WorkflowRecord, ReportStateArgs, float], Any]
"""Applies a report to the record in memory (the caller writes it); may be async."""


class LocalRunner(Protocol):
    """The saga runner of this instance, as the push path sees it (``SagaRunner``): new
    workflows it has room for are claimed in the submitting transaction."""

    def runs(self, name: str) -> bool:
        """Whether it has the definition ``name``."""

    def reserve(self, names: list[str]) -> int:
        """How many of these submits (definition names) it takes on now."""

    async def start_new(
        self, tx: Transaction, records: list[WorkflowRecord], now: float
    ) -> list[Any]:
        """Lease and start ``records`` inside ``tx`` (the rows are inserted after)."""

    async def adopt(self, reserved: int, applied: list[Any]) -> None:
        """After COMMIT (``applied`` empty when it failed): run them, free the rest."""


class _ReadFirst(Exception):
    """A submit-only batch found an id in use: run it again reading its rows first."""


class _Batch:
    """The workflows one push batch reads and writes, kept in memory until the end."""

    def __init__(
        self,
        records: dict[str, WorkflowRecord],
        flags: FlagBook | None = None,
        adoptable: int = 0,
        *,
        read: bool = True,
    ) -> None:
        self.records = records
        self.flags = flags  # the tenant's flags, for the kill switch
        self.read = read
        """False when the batch skipped reading its workflows (only submits: the insert
        itself detects an id in use)."""
        self.new: set[str] = set()
        self.dirty: set[str] = set()
        self.adoptable = adoptable
        """How many more new workflows this instance's runner claims in this push."""
        self.adopted: list[WorkflowRecord] = []

    async def write(self, tx: Transaction) -> None:
        if self.new:
            fresh = [self.records[i] for i in sorted(self.new)]
            inserted = await tx.insert_workflows(fresh)
            if len(inserted) != len(fresh):
                if not self.read:
                    raise _ReadFirst()  # an id exists: decide with the rows in hand
                # Another batch inserted the same id meanwhile; the client will resend.
                raise Unavailable("a workflow id was taken concurrently; push again")
        changed = [self.records[i] for i in sorted(self.dirty - self.new)]
        if changed:
            await tx.update_workflows(changed)


class MutationApplier:
    """Applies batches of mutations for one server.

    Args:
        store: the event store.
        workflows: definitions by name (an unknown name is rejected).
        on_report: applies a ``report_state`` inside the transaction (reconciliation);
            awaited if it returns an awaitable.
        clock: wall clock, injectable for tests.

    ``runner`` (set by the app once its saga runner runs) claims new workflows in the
    push's own transaction when it has room, so a submit needs no separate claim.
    """

    def __init__(
        self,
        store: Store,
        workflows: Mapping[str, Any],
        *,
        on_report: ReportHandler | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.workflows = workflows
        self.on_report = on_report
        self.clock = clock
        self.flags: FlagService | None = None
        """Set by the app: ``tether.accept.W`` false refuses new submits (kill switch)."""
        self.runner: LocalRunner | None = None
        self._pushing = 0
        """Pushes in flight on this applier."""

    async def push(
        self, principal: Principal, client_id: str, mutations: list[Mutation]
    ) -> list[MutationResult]:
        """Apply a batch in one transaction and return one result per mutation.

        Raises:
            Forbidden: the client id belongs to another subject of the tenant, or the
                token is not a client's.
            StorageError: the database failed; nothing was applied.
        """
        principal.require(Role.CLIENT)
        try:
            return await self._push_once(principal, client_id, mutations, None)
        except (StorageError, ValueError) as exc:
            # No poison batch (issue 11): the store refused the *data* of some mutation
            # (an outage is re-raised). Apply them one by one, so the others commit and
            # the one refused is answered ``rejected`` with the reason, never resent.
            if not refused_by_database(exc):
                raise
            if len(mutations) == 1:
                reason = storable_text(f"refused by the store: {exc}")[:500]
                return await self._push_once(principal, client_id, mutations, reason)
            results: list[MutationResult] = []
            for mutation in mutations:
                results.extend(await self.push(principal, client_id, [mutation]))
            return results

    async def _push_once(
        self,
        principal: Principal,
        client_id: str,
        mutations: list[Mutation],
        refuse: str | None,
    ) -> list[MutationResult]:
        """One transaction for the batch; with ``refuse``, each new mutation is recorded
        as rejected with that reason instead of applied."""
        tenant = principal.tenant
        now = self.clock()
        book = await self.flags.book(principal.tenant) if self.flags is not None else None
        spans = tracing.start_push_spans(mutations, client_id) if tracing.enabled() else None
        runner = self.runner
        names = [
            str(m.args.get("name"))
            for m in mutations
            if m.name == "submit_workflow" and isinstance(m.args, dict)
        ]
        # Adopt only a lone push: under concurrent pushes the claimer's batched claims
        # cost less than a claim inside every push (measured: B5, 16 clients on SQLite).
        adopt = runner is not None and self._pushing == 0 and 0 < len(names) <= ADOPT_MAX_SUBMITS
        reserved = runner.reserve(names) if runner is not None and adopt else 0
        self._pushing += 1

        read_first = False

        async def unit(tx: Transaction) -> tuple[list[MutationResult], list[Any]]:
            last = await tx.lock_client(tenant, principal.subject, client_id)
            resent = sorted({m.id for m in mutations if m.id <= last})
            originals = await tx.mutation_results(tenant, client_id, resent) if resent else {}
            # Parse first, then read every workflow the batch touches in one round trip
            # (sorted, so concurrent batches lock rows in the same order). A repeated id
            # is parsed once: its first copy is the one applied.
            parsed: dict[int, MutationArgs | TetherError] = {}
            for mutation in mutations:
                if mutation.id > last and mutation.id not in parsed:
                    try:
                        parsed[mutation.id] = parse_mutation_args(mutation)
                    except TetherError as exc:
                        parsed[mutation.id] = exc
            keys = sorted(
                {
                    WorkflowKey(tenant, a.workflow_id)
                    for a in parsed.values()
                    if not isinstance(a, Exception)
                }
            )
            # A batch of submits only needs no locked read: the insert (ON CONFLICT DO
            # NOTHING) finds an id in use, and then the batch runs again reading first.
            read = read_first or not all(
                isinstance(a, SubmitWorkflowArgs | TetherError) for a in parsed.values()
            )
            found = await tx.get_workflows(keys, lock=True) if keys and read else {}
            batch = _Batch(
                {key.id: record for key, record in found.items()}, book, reserved, read=read
            )
            results: list[MutationResult] = []
            recorded: list[tuple[int, str, str | None]] = []
            expected = last + 1
            for mutation in mutations:
                if mutation.id < expected:  # resent, or repeated within this batch
                    original = originals.get(mutation.id)
                    error = original[1] if original else None
                    results.append(MutationResult(mutation.id, MutationStatus.DUPLICATE, error))
                    continue
                if mutation.id != expected:
                    results.append(
                        MutationResult(
                            mutation.id,
                            MutationStatus.REJECTED,
                            f"{CONFLICT_PREFIX} mutation id {mutation.id} skips ahead of the "
                            f"last applied id {expected - 1}; nothing after the gap was applied",
                            code=GAP,
                        )
                    )
                    continue
                try:
                    args = parsed[mutation.id]
                    if isinstance(args, TetherError):
                        raise args
                    if refuse is not None:
                        raise ValidationError(refuse)
                    trace = tracing.traceparent(spans.get(mutation.id)) if spans else ""
                    await self._apply(tx, principal, client_id, args, batch, now, trace)
                except (StorageError, AssertionError):
                    raise
                except TetherError as exc:
                    results.append(
                        MutationResult(
                            mutation.id, MutationStatus.REJECTED, exc.message, exc.code.value
                        )
                    )
                    status, error = MutationStatus.REJECTED, exc.message
                else:
                    status, error = MutationStatus.APPLIED, None
                    results.append(MutationResult(mutation.id, status))
                recorded.append((mutation.id, status.value, error))
                originals[mutation.id] = (status.value, error)
                expected += 1
            started = (
                await runner.start_new(tx, batch.adopted, now)
                if runner is not None and batch.adopted
                else []
            )
            await batch.write(tx)
            if recorded:
                await tx.record_mutations(tenant, client_id, recorded, expected - 1, now)
            return results, started

        async def run() -> tuple[list[MutationResult], list[Any]]:
            nonlocal read_first
            try:
                return await self.store.run(unit)
            except _ReadFirst:
                read_first = True
                return await self.store.run(unit)

        results: list[MutationResult] = []
        started: list[Any] = []
        try:
            results, started = await run()
        except BaseException:
            if runner is not None:
                await runner.adopt(reserved, [])
            raise
        finally:
            self._pushing -= 1
            if spans is not None:
                tracing.end_push_spans(spans, results)
        if runner is not None:
            await runner.adopt(reserved, started)
        return results

    async def _apply(
        self,
        tx: Transaction,
        principal: Principal,
        client_id: str,
        args: MutationArgs,
        batch: _Batch,
        now: float,
        trace: str = "",
    ) -> None:
        if isinstance(args, SubmitWorkflowArgs):
            self._submit(tx, principal, client_id, args, batch, now, trace)
            return
        record = batch.records.get(args.workflow_id)
        if record is None:
            raise NotFound(f"no workflow {args.workflow_id}")
        if isinstance(args, CancelWorkflowArgs):
            intake.request_cancel(tx, record, now, client_id)
        elif isinstance(args, RetryWorkflowArgs):
            intake.request_retry(tx, record, now, client_id)
        else:
            await self.report(tx, principal, record, args, now, client_id=client_id)
        batch.dirty.add(record.id)

    def _submit(
        self,
        tx: Transaction,
        principal: Principal,
        client_id: str,
        args: SubmitWorkflowArgs,
        batch: _Batch,
        now: float,
        trace: str = "",
    ) -> None:
        definition = self.workflows.get(args.name)
        if definition is None:
            raise ValidationError(f"unknown workflow {args.name!r}")
        if len(msgspec.json.encode(args.input)) > MAX_INPUT_BYTES:
            raise ValidationError(f"workflow input is larger than {MAX_INPUT_BYTES} bytes")
        existing = batch.records.get(args.workflow_id)  # the tenant's own, by key
        if existing is not None:
            if existing.name == args.name:
                return  # idempotent: the same workflow submitted again
            raise ValidationError(
                f"workflow id {args.workflow_id} is already used by your {existing.name!r} workflow"
            )
        if batch.flags is not None and not batch.flags.accepts(
            args.name, tenant=principal.tenant, key=principal.subject
        ):
            assert self.flags is not None
            raise self.flags.refuse(args.name)
        record = WorkflowRecord(
            id=args.workflow_id,
            tenant=principal.tenant,
            name=args.name,
            status="running",
            input=args.input,
            created_at=now,
            updated_at=now,
            created_by=client_id,
        )
        adopt = (
            self.runner is not None
            and len(batch.adopted) < batch.adoptable
            and self.runner.runs(args.name)
        )
        intake.start_workflow(
            tx,
            record,
            definition,
            now,
            client_id,
            trace=trace,
            wake=not adopt,
            deadline=args.deadline,
        )
        if adopt:
            batch.adopted.append(record)
        batch.records[record.id] = record
        batch.new.add(record.id)

    async def report(
        self,
        tx: Transaction,
        principal: Principal,
        record: WorkflowRecord,
        args: ReportStateArgs,
        now: float,
        *,
        client_id: str | None = None,
    ) -> None:
        """Apply a source's state report to ``record`` inside ``tx``.

        Raises:
            Forbidden: a client token reporting for a source other than ``mini-app``.
        """
        if principal.role is Role.CLIENT and args.source is not Source.MINI_APP:
            raise Forbidden(f"a client may only report as {Source.MINI_APP.value}")
        if self.on_report is not None:
            outcome = self.on_report(tx, record, args, now)
            if hasattr(outcome, "__await__"):
                await outcome
            return
        from protocol import events
        from sync_server.snapshots import append_event

        append_event(
            tx,
            record,
            events.WORKFLOW_REPORTED,
            now,
            source=args.source.value,
            status=args.status.value,
            at=args.at,
            detail=args.detail,
            client_id=client_id,
        )
