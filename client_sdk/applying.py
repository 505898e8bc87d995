"""The ``SyncHandler`` side of ``SyncClient``: what the connection's applier calls to
make pages, verdicts, snapshots, progress and flags durable and visible.

Each method writes through the ``LocalStore`` first (one transaction, off the event
loop), then updates the in-memory overlay and live progress, then tells the change feed
which views changed. ``SyncClient`` inherits it; it is split out only to keep the
client's public API readable on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from client_sdk.changes import ChangeFeed
from client_sdk.compaction import CompactionPolicy
from client_sdk.flags import ClientFlags
from client_sdk.localstore import LocalStore, Settlement
from client_sdk.session import SessionState, SyncSession
from client_sdk.views import Overlay
from protocol import Event, Flags, Progress, TetherError

if TYPE_CHECKING:
    from client_sdk.views import WorkflowView

__all__ = ["AppliesSync"]

log = logging.getLogger("client_sdk")


class AppliesSync:
    """Mixin of ``SyncClient`` implementing ``connection.SyncHandler``."""

    _store: LocalStore
    _feed: ChangeFeed
    _overlay: Overlay
    _live: dict[str, dict[str, Progress]]
    _session: SyncSession | None
    _flags: ClientFlags
    _flag_writes: set[asyncio.Task[None]]
    _applied_since_compaction: int
    compaction: CompactionPolicy
    resets: int

    if TYPE_CHECKING:

        def get_workflow(self, workflow_id: str) -> WorkflowView | None: ...

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
