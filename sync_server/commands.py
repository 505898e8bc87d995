"""Workflow commands that arrive over HTTP rather than through a client's mutation
queue: cancel, retry, upgrade, a source's report, a dead letter's requeue.

Each is one transaction on the workflow's row, scoped like every read: a tenant's
principal names its own workflows (another tenant's id is simply not found); a global
admin names the tenant, or the one tenant holding the id. The saga rules themselves are
``sync_server.saga.intake``'s, shared with the push path (``sync_server.domain``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from protocol import BadMessage, Conflict, NotFound, ReportStateArgs, ValidationError
from sync_server.auth import Principal
from sync_server.domain import MutationApplier
from sync_server.saga import intake
from sync_server.store.base import Transaction, WorkflowRecord

__all__ = ["WorkflowCommands"]


class WorkflowCommands:
    """Commands that arrive over HTTP rather than through a client's mutation queue.

    Args:
        applier: shares the store, the definitions and the report handler.
        definitions: every definition this instance has, older versions included
            (what ``upgrade`` may move a workflow to).
    """

    def __init__(self, applier: MutationApplier, definitions: Iterable[Any] = ()) -> None:
        self.applier = applier
        self.definitions = {(d.name, d.version): d for d in definitions}

    async def tenant_of(
        self, principal: Principal, workflow_id: str, tenant: str | None = None
    ) -> str:
        """Whose workflow ``workflow_id`` names for ``principal``.

        A tenant's principal names its own; a global admin names ``tenant``, or, when it
        gives none, the one tenant holding that id.

        Raises:
            NotFound: a global admin's id that no tenant holds.
            BadMessage: a global admin's id that several tenants hold, without a tenant.
        """
        scope = principal.scope
        if scope is not None:
            return scope
        if tenant is not None:
            return tenant
        tenants = await self.applier.store.workflow_tenants(workflow_id, limit=2)
        if not tenants:
            raise NotFound(f"no workflow {workflow_id}")
        if len(tenants) > 1:
            raise BadMessage(
                f"workflow id {workflow_id} exists in several tenants; name one with ?tenant="
            )
        return tenants[0]

    async def _on_workflow(
        self,
        principal: Principal,
        workflow_id: str,
        action: Callable[[Transaction, WorkflowRecord, float], Any],
        tenant: str | None = None,
    ) -> WorkflowRecord:
        now = self.applier.clock()
        owner = await self.tenant_of(principal, workflow_id, tenant)

        async def unit(tx: Transaction) -> WorkflowRecord:
            record = await tx.get_workflow(owner, workflow_id, lock=True)
            if record is None or not principal.sees(record.tenant):
                raise NotFound(f"no workflow {workflow_id}")
            outcome = action(tx, record, now)
            if hasattr(outcome, "__await__"):
                await outcome
            await tx.update_workflow(record)
            return record

        return await self.applier.store.run(unit)

    async def cancel(
        self, principal: Principal, workflow_id: str, tenant: str | None = None
    ) -> WorkflowRecord:
        """Cancel a workflow (compensating its completed steps).

        Args:
            principal: who asks.
            workflow_id: the workflow's id.
            tenant: the workflow's tenant, for a global admin (see ``tenant_of``).

        Raises:
            NotFound: no such workflow for this tenant.
            Conflict: it has already ended.
        """
        subject = principal.subject
        return await self._on_workflow(
            principal,
            workflow_id,
            lambda tx, record, now: intake.request_cancel(tx, record, now, subject),
            tenant,
        )

    async def retry(
        self, principal: Principal, workflow_id: str, tenant: str | None = None
    ) -> WorkflowRecord:
        """Re-run the failed or parked steps of a workflow.

        Args:
            principal: who asks.
            workflow_id: the workflow's id.
            tenant: the workflow's tenant, for a global admin (see ``tenant_of``).

        Raises:
            NotFound: no such workflow for this tenant.
            Conflict: nothing to retry.
        """
        subject = principal.subject
        return await self._on_workflow(
            principal,
            workflow_id,
            lambda tx, record, now: intake.request_retry(tx, record, now, subject),
            tenant,
        )

    async def upgrade(
        self, principal: Principal, workflow_id: str, version: str, tenant: str | None = None
    ) -> WorkflowRecord:
        """Move a workflow to another version of its definition (an operator's act).

        Args:
            principal: who asks (an admin).
            workflow_id: the workflow's id.
            version: the version to move it to (this instance must have it).
            tenant: the workflow's tenant, for a global admin (see ``tenant_of``).

        Raises:
            NotFound: no such workflow for this tenant.
            ValidationError: this instance has no such version of the workflow's name.
            Conflict: the workflow has ended, has that version, or has run a step the
                version lacks.
        """
        subject = principal.subject

        def action(tx: Transaction, record: WorkflowRecord, now: float) -> None:
            definition = self.definitions.get((record.name, version))
            if definition is None:
                known = sorted(v for n, v in self.definitions if n == record.name)
                raise ValidationError(
                    f"this instance has no version {version!r} of {record.name!r} "
                    f"(it has: {', '.join(known) or 'none'})"
                )
            intake.request_upgrade(tx, record, definition, now, subject)

        return await self._on_workflow(principal, workflow_id, action, tenant)

    async def report(
        self, principal: Principal, args: ReportStateArgs, tenant: str | None = None
    ) -> WorkflowRecord:
        """Apply a source's state report.

        Args:
            principal: who reports.
            args: the report.
            tenant: the workflow's tenant, for a global admin (see ``tenant_of``).

        Raises:
            NotFound: no such workflow for this tenant.
        """
        applier = self.applier

        async def action(tx: Transaction, record: WorkflowRecord, now: float) -> None:
            await applier.report(tx, principal, record, args, now)

        return await self._on_workflow(principal, args.workflow_id, action, tenant)

    async def requeue(self, principal: Principal, entry_id: int) -> WorkflowRecord:
        """Requeue a dead letter: its workflow re-runs the dead-lettered work.

        Raises:
            NotFound: no such open dead letter for this tenant.
        """
        now = self.applier.clock()

        async def unit(tx: Transaction) -> WorkflowRecord:
            entry = await tx.get_dlq(entry_id, lock=True)
            if entry is None or not principal.sees(entry.tenant):
                raise NotFound(f"no dead letter {entry_id}")
            if entry.status != "open":
                raise Conflict(f"dead letter {entry_id} is {entry.status}, not open")
            record = await tx.get_workflow(entry.tenant, entry.workflow_id, lock=True)
            if record is None:
                raise NotFound(f"no workflow {entry.workflow_id}")
            intake.requeue_dlq(tx, entry, record, now)
            await tx.update_dlq(entry)
            await tx.update_workflow(record)
            return record

        return await self.applier.store.run(unit)
