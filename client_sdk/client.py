"""``SyncClient``: the offline-first SDK a backend embeds (SPEC, Client SDK).

It wires three parts: the durable ``LocalStore`` (group-committed SQLite), the pure
``SyncSession`` and the ``SyncConnection`` shell. Writes return only after they are
durable; views are read straight from the file (bounded memory whatever the number of
workflows) with the pending mutations and live progress laid over them.

The class is read in three files: this one (lifecycle, flags, reads, waiting),
``client_sdk.mutating`` (the mutations it queues, and their ordering rule) and
``client_sdk.applying`` (what the connection calls to apply pages and verdicts);
``client_sdk.changes`` tells watchers, callbacks and waiters what changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from client_sdk import tracing
from client_sdk.applying import AppliesSync
from client_sdk.backoff import Backoff, CircuitBreaker
from client_sdk.changes import ChangeCallback, ChangeFeed, ResetCallback
from client_sdk.compaction import CompactionPolicy
from client_sdk.connection import SyncConnection
from client_sdk.errors import ClientClosed, SyncStopped
from client_sdk.finder import WorkflowPage, find_workflows
from client_sdk.flags import ClientFlags, DirectCall
from client_sdk.localstore import Durability, LocalStore
from client_sdk.mutating import QueuesMutations
from client_sdk.session import SessionState, SyncSession
from client_sdk.views import Overlay, WorkflowView, build_view
from protocol import (
    Progress,
    TetherError,
)

__all__ = ["ChangeCallback", "ResetCallback", "SyncClient"]

log = logging.getLogger("client_sdk")


class SyncClient(QueuesMutations, AppliesSync):
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
