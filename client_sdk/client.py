"""``SyncClient``: the offline-first SDK a backend embeds (SPEC, Client SDK).

It wires three parts: the durable ``LocalStore`` (group-committed SQLite), the pure
``SyncSession`` and the ``SyncConnection`` shell. Writes return only after they are
durable; views are read straight from the file (bounded memory whatever the number of
workflows) with the pending mutations and live progress laid over them.

Ordering rule: a mutation reaches the session from a done-callback of its commit
future, never from the awaiting caller, so ids reach the session in commit order even
if a caller is cancelled mid-await (a gap would make the server refuse the rest).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import msgspec

from client_sdk import tracing
from client_sdk.backoff import Backoff, CircuitBreaker
from client_sdk.changes import ChangeCallback, ChangeFeed, ResetCallback
from client_sdk.compaction import CompactionPolicy
from client_sdk.connection import SyncConnection
from client_sdk.errors import ClientClosed, SyncStopped
from client_sdk.finder import WorkflowPage, find_workflows
from client_sdk.flags import ClientFlags, DirectCall, DirectHandle
from client_sdk.localstore import Durability, LocalStore, Settlement
from client_sdk.session import SessionState, SyncSession
from client_sdk.views import Overlay, WorkflowHandle, WorkflowView, build_view
from protocol import (
    MUTATION_ARGS,
    Event,
    Flags,
    Mutation,
    Progress,
    TetherError,
    ValidationError,
)
from protocol.codec import check_args, check_text
from protocol.limits import MAX_MUTATION_BYTES

__all__ = ["ChangeCallback", "ResetCallback", "SyncClient"]

log = logging.getLogger("client_sdk")

JSONInput = dict[str, Any]


class SyncClient:
    """Durable offline queue + optimistic views + background sync with one server.

    Args:
        url: the server's base URL (``ws://host:port``; ``http://`` works too).
        token: a client token (JWT) of the tenant.
        path: the SQLite file; created with a fresh client id if missing.
        client_id: the id for a new file (an existing file keeps its own).
        durability: ``"full"`` (fsync per commit; SPEC promise 1) or ``"normal"``
            (survives a killed process, may lose the last commits on power loss).
        connect: False keeps the client offline (queue only; useful for tests/tools).
        http_fallback: poll over HTTP when WebSocket upgrades keep being refused.
        stall_timeout: seconds of silence, while a reply is owed, before reconnecting.
        backoff: reconnect backoff policy (injected RNG for tests).
        breaker: circuit breaker around connecting.
        compaction: what the file keeps (event log length, how long finished
            workflows stay); the default keeps 100,000 events and 30 days.
        connection_options: more ``SyncConnection`` keyword arguments.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        path: str | os.PathLike[str],
        client_id: str | None = None,
        durability: Durability = "full",
        connect: bool = True,
        http_fallback: bool = True,
        stall_timeout: float = 15.0,
        backoff: Backoff | None = None,
        breaker: CircuitBreaker | None = None,
        compaction: CompactionPolicy | None = None,
        **connection_options: Any,
    ) -> None:
        self.url = url
        self._token = token
        self._store = LocalStore(path, durability=durability, client_id=client_id)
        self._connect = connect
        self._conn_args: dict[str, Any] = dict(
            http_fallback=http_fallback,
            stall_timeout=stall_timeout,
            backoff=backoff,
            breaker=breaker,
            **connection_options,
        )
        self._session: SyncSession | None = None
        self._conn: SyncConnection | None = None
        # The overlay mirrors the file's pending rows: a mutation leaves it only after
        # its verdict committed, so it (not the session's in-memory count, which drops
        # a mutation as soon as the PushResult is read) says what is still pending.
        self._overlay = Overlay()
        self._live: dict[str, dict[str, Progress]] = {}
        self._feed = ChangeFeed(self.get_workflow)
        self.compaction = compaction or CompactionPolicy()
        self._applied_since_compaction = 0
        self.resets = 0
        """Resets done since start (the cursor fell behind the retention horizon)."""
        self._closed = False
        self._flags = ClientFlags(token)
        self._flag_writes: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> SyncClient:
        """Open the local file and start syncing in the background (works offline).

        Raises:
            LocalStoreError: the file is corrupt, foreign, or used by another client.
        """
        if self._session is not None:
            return self
        tracing.configure_from_env()
        opened = await asyncio.to_thread(self._store.open)
        self._flags.load(await asyncio.to_thread(self._store.load_flags))
        self._session = SyncSession(
            opened.client_id,
            cursor=opened.cursor,
            last_mutation_id=opened.last_mutation_id,
            pending=opened.pending,
        )
        self._overlay = Overlay(opened.pending)
        await self.compact()
        if self._connect:
            self._conn = SyncConnection(
                self.url, self._token, self._session, self, **self._conn_args
            )
            self._conn.start()
        log.info(
            "client %s opened %s (cursor %d, %d pending)",
            opened.client_id,
            self._store.path,
            opened.cursor,
            len(opened.pending),
        )
        return self

    async def close(self) -> None:
        """Stop syncing and close the file; queued mutations stay for the next start."""
        if self._closed:
            return
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
        if self._flag_writes:
            await asyncio.gather(*self._flag_writes, return_exceptions=True)
        await asyncio.to_thread(self._store.close)
        self._feed.end_watches()
        self._feed.notify_waiters()

    async def __aenter__(self) -> SyncClient:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _live_session(self) -> SyncSession:
        if self._session is None or self._closed:
            raise ClientClosed("SyncClient is not started (use `async with` or start())")
        return self._session

    # --------------------------------------------------------------- properties
    @property
    def client_id(self) -> str:
        """This client's id (persisted in the file)."""
        return self._live_session().client_id

    @property
    def pending_count(self) -> int:
        """Mutations queued locally whose verdict from the server is not yet recorded."""
        self._live_session()
        return len(self._overlay)

    @property
    def oldest_pending_age(self) -> float:
        """Seconds the oldest unconfirmed mutation has waited (0 if none): a stuck alarm."""
        oldest = self._live_session().oldest_pending
        return 0.0 if oldest is None else max(0.0, time.time() - oldest.created_at)

    @property
    def connected(self) -> bool:
        """True while synced with the server (WebSocket after Welcome, or HTTP polling)."""
        return self._conn is not None and self._conn.connected

    @property
    def transport(self) -> str | None:
        """``"websocket"``, ``"http"`` or None when offline."""
        return self._conn.transport if self._conn is not None and self.connected else None

    @property
    def cursor(self) -> int:
        """The highest event ``seq`` durably applied."""
        return self._live_session().cursor

    @property
    def last_error(self) -> TetherError | None:
        """The last error from the server or the one that stopped syncing."""
        return self._session.error if self._session is not None else None

    @property
    def store(self) -> LocalStore:
        """The local store (diagnostics and tests)."""
        return self._store

    @property
    def session(self) -> SyncSession:
        """The sync session core (diagnostics and tests)."""
        return self._live_session()

    @property
    def connection(self) -> SyncConnection | None:
        """The I/O shell, if connecting is enabled."""
        return self._conn

    # ----------------------------------------------------------------- mutations
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
            return DirectHandle(self, workflow_id, name, result)
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
        return WorkflowHandle(self, workflow_id)

    # --------------------------------------------------------------------- flags
    def flag(self, name: str, default: Any, key: str | None = None) -> Any:
        """Evaluate a flag locally with the last known set (works offline).

        Args:
            name: the flag.
            default: the value if the flag is unknown.
            key: the targeting key (default: the token's subject).

        Returns:
            The flag's value for this tenant and key.
        """
        return self._flags.value(name, default, key)

    def register_direct(self, name: str, call: DirectCall) -> None:
        """Register the direct path of workflow ``name``: ``await call(input)`` is what
        the application does without Tether; ``tether.route.<name>`` decides per subject.

        Raises:
            ValidationError: ``call`` is not callable.
        """
        self._flags.register_direct(name, call)

    @property
    def flags(self) -> ClientFlags:
        """The flag state (compiled set, path counts ``counts``, ``registry`` of
        ``tether_client_*`` metrics)."""
        return self._flags

    async def cancel_workflow(self, workflow_id: str) -> WorkflowHandle:
        """Queue a cancellation (durable when this returns).

        Raises:
            ValidationError: not a workflow id. LocalStoreError, ClientClosed as above.
        """
        await self._enqueue("cancel_workflow", workflow_id, {"workflow_id": workflow_id})
        return WorkflowHandle(self, workflow_id)

    async def retry_workflow(self, workflow_id: str) -> WorkflowHandle:
        """Queue a retry of the failed or parked steps (durable when this returns).

        Raises:
            ValidationError: not a workflow id. LocalStoreError, ClientClosed as above.
        """
        await self._enqueue("retry_workflow", workflow_id, {"workflow_id": workflow_id})
        return WorkflowHandle(self, workflow_id)

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
        return WorkflowHandle(self, workflow_id)

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

    # ---------------------------------------------------------------------- reads
    def get_workflow(self, workflow_id: str) -> WorkflowView | None:
        """The local view: confirmed state with pending changes laid over it.

        Returns:
            The view, or None if this client has never heard of the workflow.
        """
        self._live_session()
        return build_view(
            self._store.get_row(workflow_id),
            self._overlay.pending_for(workflow_id),
            self._live.get(workflow_id),
        )

    async def find_workflows(self, **filters: Any) -> WorkflowPage:
        """One page of the server's listing of this tenant's workflows, newest first
        (not only this client's): filters ``name``, ``status``, ``version``,
        ``created_after``, ``created_before``, ``cursor``, ``limit`` — see
        ``client_sdk.finder.find_workflows``. Needs the server to be reachable.

        Raises:
            ValidationError, Unavailable, TetherError: see ``find_workflows``.
        """
        self._live_session()
        assert self._conn is not None
        return await find_workflows(self._conn.http_client(), **filters)

    def list_workflows(self, status: str | None = None) -> list[WorkflowView]:
        """Every known workflow's view (unconfirmed submits first), optionally of one status."""
        self._live_session()
        rows = {row.id: row for row in self._store.list_rows()}
        ids = [i for i in reversed(self._overlay.workflow_ids()) if i not in rows]
        ids += list(rows)
        views = [
            build_view(rows.get(i), self._overlay.pending_for(i), self._live.get(i)) for i in ids
        ]
        return [v for v in views if v is not None and (status is None or v.status == status)]

    def watch(self, workflow_id: str) -> AsyncIterator[WorkflowView]:
        """Yield the view now and after every change, until it is terminal.

        The iterator also ends when the client closes.
        """
        return self._feed.watch(workflow_id)

    async def wait(self, workflow_id: str, timeout: float | None = None) -> WorkflowView:
        """Wait for the workflow's terminal view.

        Raises:
            TimeoutError: not terminal within ``timeout`` seconds.
            SyncStopped: syncing stopped for good (e.g. the token was refused).
        """

        async def terminal() -> WorkflowView:
            async for view in self.watch(workflow_id):
                if view.terminal:
                    return view
                self._raise_if_stopped()
            self._raise_if_stopped()
            raise ClientClosed("client closed while waiting")

        return await asyncio.wait_for(terminal(), timeout)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(view)`` after every committed change of any workflow.

        Returns:
            A function that unregisters the callback.
        """
        return self._feed.on_change(callback)

    def on_reset(self, callback: ResetCallback) -> Callable[[], None]:
        """Call ``callback(horizon)`` after each reset from current snapshots (the
        server had pruned events this client had not seen; ``on_change`` also fires for
        every workflow the reset changed).

        Returns:
            A function that unregisters the callback.
        """
        return self._feed.on_reset(callback)

    async def flush(self, timeout: float | None = None) -> None:
        """Return when every queued mutation is settled by the server (and recorded).

        "Recorded" means the verdict has committed to the file: a PushResult the
        applier has not written yet (it may still be busy with an earlier page) does
        not count, so a process killed right after ``flush`` returns resends nothing.

        Raises:
            TimeoutError: mutations are still pending after ``timeout`` seconds.
            SyncStopped: syncing stopped for good; the mutations stay queued.
        """
        self._live_session()

        async def settled() -> None:
            while len(self._overlay):
                self._raise_if_stopped()
                if self._closed:
                    raise ClientClosed("client closed during flush")
                await self._feed.next_change()

        await asyncio.wait_for(settled(), timeout)

    def _raise_if_stopped(self) -> None:
        session = self._session
        if session is not None and session.state is SessionState.FAILED and session.error:
            raise SyncStopped(session.error)

    # ------------------------------------------------------- SyncHandler (shell)
    async def compact(self) -> tuple[int, int]:
        """Compact the file now by ``self.compaction`` (also done at start and after
        every ``compaction.every`` applied events).

        Returns:
            (events deleted, finished workflows deleted).
        """
        self._applied_since_compaction = 0
        deleted = await self._store.compact(self.compaction, time.time())
        if any(deleted):
            log.info("compacted %s: %d events, %d finished workflows", self._store.path, *deleted)
        return deleted

    async def apply_events(self, events: list[Event], cursor: int) -> None:
        """Durably apply a page (called by the connection's applier)."""
        changed = await self._store.apply_events(events, cursor)
        if self._feed.watching:
            # A watched workflow's events name their trace: the line an operator needs
            # to find the request in the tracing backend.
            for event in events:
                if self._feed.watched(event.workflow_id) and "trace_id" in event.data:
                    log.info(
                        "workflow %s: %s (trace_id %s)",
                        event.workflow_id,
                        event.type,
                        event.data["trace_id"],
                    )
        self._applied_since_compaction += len(events)
        if self._applied_since_compaction >= self.compaction.every:
            await self.compact()
        for workflow_id in changed:
            live = self._live.get(workflow_id)
            if live is not None:
                view = self.get_workflow(workflow_id)
                if view is not None and view.status != "running":
                    self._live.pop(workflow_id, None)
        self._feed.changed(changed)

    async def settle(self, results: list[tuple[int, bool, str | None]]) -> None:
        """Durably record the server's verdicts (called by the applier)."""
        changed = await self._store.settle([Settlement(*r) for r in results])
        changed |= self._overlay.remove(r[0] for r in results)
        for mid, applied, error in results:
            if not applied:
                log.warning("mutation %d rejected by the server: %s", mid, error)
        self._feed.changed(changed)

    async def apply_snapshots(self, snapshots: list[dict[str, Any]]) -> None:
        """Store current snapshots (progressive sync)."""
        self._feed.changed(await self._store.apply_snapshots(snapshots))

    async def reset(self, snapshots: list[dict[str, Any]], *, horizon: int, complete: bool) -> None:
        """Rebuild the views from current snapshots (called by the applier on a reset)."""
        self._feed.changed(await self._store.reset(snapshots, complete=complete))
        self.resets += 1
        self._feed.reset_done(horizon)

    def show_progress(self, progress: Progress) -> None:
        """Ephemeral live progress from the server."""
        self._live.setdefault(progress.workflow_id, {})[progress.step] = progress
        self._feed.changed({progress.workflow_id})

    def apply_flags(self, flags: Flags) -> None:
        """The tenant's flag set from the server: used at once, then stored."""
        self._flags.receive(flags)
        task = asyncio.create_task(self._save_flags(flags))
        self._flag_writes.add(task)
        task.add_done_callback(self._flag_writes.discard)

    async def _save_flags(self, flags: Flags) -> None:
        try:
            await self._store.save_flags(flags)
        except TetherError as exc:  # the in-memory set is current; the next one retries
            log.warning("could not store the flag set: %s", exc.message)

    def state_changed(self) -> None:
        """Connection or session state changed."""
        self._feed.notify_waiters()
        if self._session is not None and self._session.state is SessionState.FAILED:
            self._feed.end_watches()
