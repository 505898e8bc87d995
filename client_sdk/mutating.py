"""The writing side of ``SyncClient``: every mutation (submit, cancel, retry, report)
is checked as the server would check it, appended to the durable queue, and returns once
its group commit is durable; then it is laid over the view and handed to the session.

Ordering rule: a mutation reaches the session from a done-callback of its commit
future, never from the awaiting caller, so ids reach the session in commit order even
if a caller is cancelled mid-await (a gap would make the server refuse the rest).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import msgspec

from client_sdk import tracing
from client_sdk.changes import ChangeFeed
from client_sdk.connection import SyncConnection
from client_sdk.flags import ClientFlags, DirectHandle
from client_sdk.localstore import LocalStore
from client_sdk.session import SyncSession
from client_sdk.views import Overlay, WorkflowHandle
from protocol import MUTATION_ARGS, Mutation, ValidationError
from protocol.codec import check_args, check_text
from protocol.limits import MAX_MUTATION_BYTES

if TYPE_CHECKING:
    from client_sdk.client import SyncClient
    from client_sdk.views import WorkflowView

__all__ = ["JSONInput", "QueuesMutations"]

JSONInput = dict[str, Any]


class QueuesMutations:
    """Mixin of ``SyncClient``: the mutations it queues."""

    _store: LocalStore
    _feed: ChangeFeed
    _overlay: Overlay
    _session: SyncSession | None
    _conn: SyncConnection | None
    _flags: ClientFlags

    if TYPE_CHECKING:

        def get_workflow(self, workflow_id: str) -> WorkflowView | None: ...

        def _live_session(self) -> SyncSession: ...

    def _client(self) -> SyncClient:
        """``self``, as the ``SyncClient`` this is a part of (handles refer to it)."""
        return cast("SyncClient", self)

    async def submit_workflow(
        self,
        name: str,
        input: JSONInput | None = None,
        *,
        workflow_id: str | None = None,
        key: str | None = None,
        deadline: float | None = None,
    ) -> WorkflowHandle:
        """Queue a new workflow; durable when this returns; works offline.

        If a direct path is registered for ``name`` (``register_direct``) and
        ``tether.route.<name>`` puts ``key`` outside the rollout, the direct call is
        made instead and its result comes back in a ``DirectHandle`` (terminal at once).

        Args:
            name: the workflow definition's name.
            input: its JSON input.
            workflow_id: a UUID string; the same id submitted again is not queued twice.
                None picks a fresh one; anything else that is not a UUID (``""``
                included) is refused, never silently replaced.
            key: the targeting key of the route flag (default: the token's subject).
            deadline: seconds the whole workflow may take from its acceptance by the
                server; the definition's own deadline also applies (the shorter wins).

        Returns:
            A handle; ``get_workflow(handle.id)`` shows it at once as ``pending``.

        Raises:
            ValidationError: bad name or id, or an input the server could never accept
                (over ``MAX_INPUT_BYTES``, a NaN/±inf, a NUL character); nothing is
                queued.
            LocalStoreError: the write failed (nothing is queued).
            ClientClosed: the client is not started.
            Exception: whatever the direct call raised (direct path only).
        """
        if workflow_id is None:
            workflow_id = str(uuid.uuid4())
        elif not isinstance(workflow_id, str) or not workflow_id:
            raise ValidationError(f"workflow_id must be a UUID string, got {workflow_id!r}")
        direct = self._flags.direct_path(name, key)
        if direct is not None:
            self._live_session()
            self._flags.count(name, "direct")
            started = time.perf_counter()
            try:
                result = await direct(dict(input or {}))
            except Exception:
                self._flags.direct_failed(name)
                raise
            finally:
                self._flags.direct_seconds.labels(name).observe(time.perf_counter() - started)
            return DirectHandle(self._client(), workflow_id, name, result)
        self._flags.count(name, "tether")
        args: dict[str, Any] = {"workflow_id": workflow_id, "name": name, "input": input or {}}
        if deadline is not None:
            args["deadline"] = deadline
        span, traceparent = tracing.start_submit(name, workflow_id)
        try:
            await self._enqueue(
                "submit_workflow", workflow_id, args, workflow_name=name, traceparent=traceparent
            )
        finally:
            if span is not None:
                span.end()
        return WorkflowHandle(self._client(), workflow_id)

    async def cancel_workflow(self, workflow_id: str) -> WorkflowHandle:
        """Queue a cancellation (durable when this returns).

        Raises:
            ValidationError: not a workflow id. LocalStoreError, ClientClosed as above.
        """
        await self._enqueue("cancel_workflow", workflow_id, {"workflow_id": workflow_id})
        return WorkflowHandle(self._client(), workflow_id)

    async def retry_workflow(self, workflow_id: str) -> WorkflowHandle:
        """Queue a retry of the failed or parked steps (durable when this returns).

        Raises:
            ValidationError: not a workflow id. LocalStoreError, ClientClosed as above.
        """
        await self._enqueue("retry_workflow", workflow_id, {"workflow_id": workflow_id})
        return WorkflowHandle(self._client(), workflow_id)

    async def report_state(
        self, workflow_id: str, *, detail: dict[str, Any] | None = None
    ) -> WorkflowHandle:
        """Report this client's confirmed view of a workflow to the server, as the
        ``mini-app`` reconciliation source (queued like any mutation). If the view has
        diverged from the canonical state, the server answers with a
        ``workflow.reconciled`` event carrying the canonical snapshot, and the view
        converges to it.

        Raises:
            ValidationError: no local view of the workflow, or it is still pending.
            LocalStoreError, ClientClosed: as for ``submit_workflow``.
        """
        view = self.get_workflow(workflow_id)
        if view is None or view.pending:
            raise ValidationError(f"no confirmed local view of workflow {workflow_id} to report")
        args = {
            "workflow_id": workflow_id,
            "source": "mini-app",
            "status": view.status,
            "at": time.time(),
            "detail": detail or {},
        }
        await self._enqueue("report_state", workflow_id, args)
        return WorkflowHandle(self._client(), workflow_id)

    async def _enqueue(
        self,
        name: str,
        workflow_id: str,
        args: dict[str, Any],
        workflow_name: str | None = None,
        traceparent: str = "",
    ) -> Mutation | None:
        self._live_session()
        # Refuse here what the server would refuse: a mutation that can never be
        # accepted must not enter the queue (promise 7: nothing waits behind it).
        try:
            parsed = msgspec.convert(args, MUTATION_ARGS[name])
            encoded = msgspec.json.encode(args)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise ValidationError(f"invalid {name}: {exc}") from exc
        check_args(parsed)
        check_text(args, f"args of {name}")
        if len(encoded) > MAX_MUTATION_BYTES:
            raise ValidationError(
                f"{name} of {len(encoded)} bytes is over the limit of {MAX_MUTATION_BYTES}"
            )
        future = self._store.enqueue(
            name,
            workflow_id,
            args,
            created_at=time.time(),
            workflow_name=workflow_name,
            args_json=encoded,
            traceparent=traceparent,
        )
        future.add_done_callback(self._enqueued)
        # shield: a cancelled caller must not cancel the commit future (see module doc).
        return await asyncio.shield(future)

    def _enqueued(self, future: asyncio.Future[Mutation | None]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        mutation = future.result()
        if mutation is None or self._session is None:
            return
        workflow_id = self._overlay.add(mutation)
        self._session.send_mutation(mutation)
        if self._conn is not None:
            self._conn.kick()
        self._feed.changed({workflow_id})
