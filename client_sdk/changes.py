"""Who hears about a changed view: ``SyncClient``'s change feed.

Four kinds of listeners, all fed from one place (``ChangeFeed.changed``) after a
change committed to the local file or arrived as live progress:

* watchers of one workflow (``watch``): a queue each, ended when the client closes or
  syncing fails for good;
* ``on_change`` callbacks: every changed view;
* ``on_reset`` callbacks: the horizon of each reset from current snapshots;
* waiters for "anything changed" (``next_change``): ``flush`` and ``wait`` re-check
  their condition on each.

A broken callback is logged and never stops syncing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from client_sdk.views import WorkflowView

__all__ = ["ChangeCallback", "ChangeFeed", "ResetCallback"]

log = logging.getLogger("client_sdk")

_CLOSED: Any = object()
"""Put on a watcher's queue: the watch ends."""


class ChangeCallback(Protocol):
    """Called with the new view after every committed change."""

    def __call__(self, view: WorkflowView) -> None: ...


class ResetCallback(Protocol):
    """Called after a reset from current snapshots, with the server's retention horizon
    (the highest pruned ``seq``)."""

    def __call__(self, horizon: int) -> None: ...


class ChangeFeed:
    """Listeners of the client's views.

    Args:
        view_of: the current view of a workflow (None if unknown).
    """

    def __init__(self, view_of: Callable[[str], WorkflowView | None]) -> None:
        self._view_of = view_of
        self._watchers: dict[str, list[asyncio.Queue[WorkflowView]]] = {}
        self._callbacks: list[ChangeCallback] = []
        self._reset_callbacks: list[ResetCallback] = []
        self._waiters: list[asyncio.Future[None]] = []

    def watched(self, workflow_id: str) -> bool:
        """Whether someone watches ``workflow_id``."""
        return workflow_id in self._watchers

    @property
    def watching(self) -> bool:
        """Whether any workflow is watched."""
        return bool(self._watchers)

    # --------------------------------------------------------------- listeners
    async def watch(self, workflow_id: str) -> AsyncIterator[WorkflowView]:
        """Yield the view now and after every change, until it is terminal or the
        watch is ended (``end_watches``)."""
        queue: asyncio.Queue[WorkflowView] = asyncio.Queue()
        self._watchers.setdefault(workflow_id, []).append(queue)
        try:
            last = self._view_of(workflow_id)
            if last is not None:
                yield last
                if last.terminal:
                    return
            while True:
                view = await queue.get()
                if view is _CLOSED:
                    return
                if view == last:
                    continue
                last = view
                yield view
                if view.terminal:
                    return
        finally:
            queues = self._watchers.get(workflow_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._watchers.pop(workflow_id, None)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Register ``callback``; returns a function that unregisters it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def on_reset(self, callback: ResetCallback) -> Callable[[], None]:
        """Register ``callback``; returns a function that unregisters it."""
        self._reset_callbacks.append(callback)
        return lambda: (
            self._reset_callbacks.remove(callback) if callback in self._reset_callbacks else None
        )

    async def next_change(self) -> None:
        """Return after the next change (or state change) of anything."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    # ------------------------------------------------------------------ events
    def notify_waiters(self) -> None:
        """Wake every ``next_change``."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def changed(self, ids: set[str]) -> None:
        """These workflows' views changed: tell the waiters, watchers and callbacks."""
        self.notify_waiters()
        if not self._callbacks and not self._watchers:
            return
        for workflow_id in ids:
            queues = self._watchers.get(workflow_id)
            if not queues and not self._callbacks:
                continue
            view = self._view_of(workflow_id)
            if view is None:
                continue
            for q in queues or ():
                q.put_nowait(view)
            for callback in list(self._callbacks):
                try:
                    callback(view)
                except Exception:  # a broken callback must not stop syncing
                    log.exception("on_change callback failed")

    def reset_done(self, horizon: int) -> None:
        """A reset from current snapshots finished: tell the ``on_reset`` callbacks."""
        for callback in list(self._reset_callbacks):
            try:
                callback(horizon)
            except Exception:  # a broken callback must not stop syncing
                log.exception("on_reset callback failed")

    def end_watches(self) -> None:
        """End every watch (the client closed, or syncing failed for good)."""
        for queues in self._watchers.values():
            for q in queues:
                q.put_nowait(_CLOSED)
